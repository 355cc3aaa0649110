"""The main job's steps (fusion_jax.run is the recipe that runs them in order): prepare the data,
tokenizer and base model (`prepare`), plan the training stages (`stages`), train them
(`train`), evaluate and sample answers (`evaluate`), export (`export`), summarise (`summary`)."""


def say(msg: str) -> None:
  """One progress line of the main job."""
  print(f"[fusion_jax.run] {msg}", flush=True)
