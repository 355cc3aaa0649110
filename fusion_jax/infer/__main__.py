r"""Ask a FUSION model questions (KV-cached generation, fusion_jax/infer/generator.py).

  python -m fusion_jax.infer --workdir DIR --image IMG.png --question "What color is it?"
  python -m fusion_jax.infer --workdir DIR --data DATA/heldout.json [--num 5]
      [--step N] [--dtype bfloat16] [--max_new_tokens 64] [--temperature 0] [--top_p 1]
      [--top_k 0] [--q 4]

DIR is a training workdir (newest checkpoint, or --step) or a model dir written by
import_torch / import_hf (fusion_jax/infer/load.py).

--image/--question answers one question about one image. --data answers the first question of
the first --num records of a LLaVA JSON/JSONL file (images relative to the file's directory)
and prints the reference answer beside the model's. Sequence length, questions per sample,
q and the template come from the run's config (its data.seq_len, data.max_questions,
data.eval_q), or from a model dir's defaults (fusion_jax.infer.load.model_dir_layout).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

from fusion_jax.infer.load import define_loader_flags

FLAGS = flags.FLAGS
define_loader_flags()
flags.DEFINE_string("image", "", "image file for --question")
flags.DEFINE_string("question", "", "the question to ask about --image")
flags.DEFINE_string("data", "", "LLaVA .json/.jsonl records: answer their first question")
flags.DEFINE_integer("num", 5, "records of --data to answer")
flags.DEFINE_integer("max_new_tokens", 64, "answer length limit in tokens")
flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sampling")
flags.DEFINE_float("top_p", 1.0, "sampling: nucleus probability mass (1: off)")
flags.DEFINE_integer("top_k", 0, "sampling: keep the k most likely tokens (0: off)")
flags.DEFINE_integer("q", 0, "latent tokens per question (0: the run's data.eval_q)")
flags.DEFINE_integer("seed", 0, "sampling seed")


def _prompts() -> tuple[list[dict], list[str], str]:
  """(prompt records, reference answers or '', image root) from the flags."""
  if FLAGS.image or FLAGS.question:
    if not (FLAGS.image and FLAGS.question):
      raise app.UsageError("--image and --question go together")
    if not os.path.isfile(FLAGS.image):
      raise app.UsageError(f"--image {FLAGS.image}: no such file")
    rec = {"id": os.path.basename(FLAGS.image), "image": os.path.abspath(FLAGS.image),
           "conversations": [{"from": "human", "value": "<image>\n" + FLAGS.question}]}
    return [rec], [""], ""
  if not FLAGS.data:
    raise app.UsageError("give --image and --question, or --data FILE")
  from fusion_jax.data.sources import iter_records
  from fusion_jax.infer.generate import first_questions
  prompts, refs = first_questions(list(iter_records(FLAGS.data)), FLAGS.num)
  if not prompts:
    raise app.UsageError(f"--data {FLAGS.data}: no record starts with a user turn")
  return prompts, refs, os.path.dirname(os.path.abspath(FLAGS.data))


def main(argv) -> None:
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  from fusion_jax.infer.generate import answer_model, question_text
  from fusion_jax.infer.load import load_model

  prompts, refs, image_root = _prompts()
  try:
    model = load_model(FLAGS.workdir, step=FLAGS.step, dtype=FLAGS.dtype,
                       seq_len=FLAGS.seq_len)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None
  try:
    answers = answer_model(model, prompts, image_root=image_root, q=FLAGS.q,
                           max_new_tokens=FLAGS.max_new_tokens, temperature=FLAGS.temperature,
                           top_p=FLAGS.top_p, top_k=FLAGS.top_k, seed=FLAGS.seed)
  except ValueError as e:  # BadSample, a prompt too long: one line each
    sys.exit(f"infer: error: {e}")
  print(f"{FLAGS.workdir}" + (f" at step {model.step}:" if model.step is not None else
                               f" ({model.name}, compute dtype {model.cfg.llm.dtype}):"))
  for rec, ref, ans in zip(prompts, refs, answers):
    print(json.dumps({"id": rec.get("id"), "question": question_text(rec), "answer": ans,
                      **({"reference": ref} if ref else {})}, ensure_ascii=False))


if __name__ == "__main__":
  app.run(main)
