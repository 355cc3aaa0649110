r"""A tiny FUSION (preset 'tiny': every mechanism on, CPU-sized) on a small LLaVA JSON dataset.

Used by the tests (tests/test_fusion_train.py builds the dataset and tokenizer in a tmp dir); by
hand, with any LLaVA-format JSON / JSONL and a Phi-3-style tokenizer of at most 320 tokens
(e.g. fusion_jax.data.tokenizer_train.train_sentencepiece on your captions):

  python -m fusion_jax.train --config experiments/fusion_tiny.py --workdir /tmp/fusion_tiny \
      --config.data.paths=DATA/data.json --config.data.image_root=DATA \
      --config.data.tokenizer=DATA/tok

On 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) add
`--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` for a 3-D mesh (the
vocabulary, 320, divides the tensor axis).
"""
import ml_collections

from fusion_jax.train.config import base_config
from fusion_jax.task.fusion import model_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  c = base_config()
  c.task = "fusion"
  # The tiny preset with the Phi-3 template (the tests' sentencepiece tokenizer), a vocabulary
  # rounded up to a multiple of 8 (it splits over any tensor axis up to 8), and fewer layers
  # (compile time is most of a CPU test): 2 decoder layers, each followed by an interaction
  # layer, and a 2-layer tower. Every other preset field is listed (None) and can be set with
  # --config.model.overrides.FIELD=... (e.g. vision.image_size=64).
  c.model = model_config("tiny", template="phi_3", llm=dict(vocab_size=320, num_layers=2),
                         vision=dict(num_layers=2), interaction_stride=1)
  # One of paths (LLaVA JSON / JSONL / ArrayRecord) or mixture (a mixture YAML) is given.
  c.data = ml_collections.ConfigDict(dict(
      paths="", mixture="", image_root="", tokenizer="", num_examples=0, seq_len=128,
      max_questions=2, seed=0, shuffle=True, worker_count=0, read_threads=2, read_buffer=8,
      prefetch=0, allow_absolute_image_paths=False, pad_final_batch=False, packing=False,
      max_samples_per_row=4))
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.global_batch = 8
  c.num_steps = 4
  c.optim.lr = 1e-3
  c.optim.warmup_frac = 0.0
  c.optim.rules = ()                  # e.g. (("^vision_tower/", "freeze"),)
  c.checkpoint.every = 2
  c.checkpoint.keep_last = 2
  c.log_every = 1
  c.compute_dtype = "float32"
  c.remat_policy = "none"
  return c
