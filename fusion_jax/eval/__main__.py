r"""Held-out closed-answer accuracy of a FUSION model.

  python -m fusion_jax.eval --workdir runs/smoke [--split heldout] [--step N] [--data FILE]
  python -m fusion_jax.eval --workdir MODEL_DIR --data FILE [--dtype bfloat16]

--workdir is a training workdir (newest checkpoint, or --step) or a model dir written by
import_torch / import_hf (fusion_jax/infer/load.py); a model dir needs --data.

Scores every closed question of the split by candidate log-likelihood (fusion_jax/eval/
closed_qa.py), prints accuracy vs chance per category, and writes
<workdir>/eval_<split>.json and <workdir>/eval_<split>.png.
"""
from __future__ import annotations

from absl import app, flags, logging

from fusion_jax.eval.evaluate import run_eval
from fusion_jax.infer.load import define_loader_flags

FLAGS = flags.FLAGS
define_loader_flags()
flags.DEFINE_string("split", "heldout", "split name: <data dir>/<split>.json")
flags.DEFINE_string("data", "", "records file to evaluate (default: the split next to the "
                    "run's training data)")
flags.DEFINE_integer("batch_size", 32, "sequences per scoring batch")


def main(argv) -> None:
  del argv
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  logging.set_verbosity(logging.WARNING)
  try:
    run_eval(FLAGS.workdir, split=FLAGS.split, data=FLAGS.data, step=FLAGS.step,
             batch_size=FLAGS.batch_size, dtype=FLAGS.dtype, seq_len=FLAGS.seq_len)
  except (FileNotFoundError, ValueError) as e:
    raise app.UsageError(str(e)) from None


if __name__ == "__main__":
  app.run(main)
