r"""Train the main job's model on one kind of question alone: does it learn to read it?

  python benchmarks/one_kind.py --config experiments/smoke.py --workdir runs/one_kind
      --kind shape [--category SynthScene] [--steps 400] [--config.KEY=VALUE ...]

Takes the config's dataset (synthesized once into its cache, as the main job does), keeps the
training records whose first closed question is of answer kind --kind (and of --category, if
given), trains one stage on them from the config's base models at the alignment stage's 128
tokens, then scores the held-out split (the job's own eval and summary) and those training
records, per kind of answer (fusion_jax.eval.closed_qa). A kind that stays near chance even on
its own training records after thousands of samples is one the model is slow to read, not one
the main job's mix starves. Not part of CI (~4 min on 2 cores for 400 steps).

Measured (2026-11-28, --kind shape --category SynthScene, 1 148 records, 400 steps = 6 400
samples from assets/tiny_bases): shape 0.344 on those training records, 0.265 on SynthScene's
held-out shape questions (chance 0.2); a linear probe on an object's tower tokens reads its
shape at 0.51 (benchmarks/tower_features_probe.py). --kind spatial --category SynthSpatial
(2 340 records), 1 600 steps: 0.150 held-out with the shipped tower (training CE flat), 0.433
with one whose tokens name their own position (fusion_jax.pretrain.refine --position_weight 1;
learned after ~11 000 samples; docs/main_job.md, "Spatial relations").
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from fusion_jax import run as run_lib  # noqa: E402
from fusion_jax.eval import closed_qa  # noqa: E402
from fusion_jax.eval.evaluate import run_eval  # noqa: E402

FLAGS = flags.FLAGS
# --config (with --config.KEY=VALUE overrides) and --workdir are fusion_jax.run's flags.
flags.DEFINE_string("kind", None, "answer kind of the first closed question (shape, spatial, "
                    "yes_no, color, count, pattern, difference, choice)")
flags.DEFINE_string("category", "", "only this category's records ('' = every category)")
flags.DEFINE_integer("steps", 400, "training steps (batch: the config's global_batch)")


def select(records: list[dict], kind: str, category: str = "") -> list[dict]:
  """The records whose first closed question has answer kind `kind` (and category)."""
  first: dict[int, closed_qa.Question] = {}
  for q in closed_qa.closed_questions(records):
    first.setdefault(q.record_index, q)
  return [records[i] for i, q in sorted(first.items())
          if q.answer_type == kind and (not category or q.category == category)]


def main(argv) -> None:
  del argv
  a = FLAGS
  if a.config is None or not a.workdir or not a.kind:
    raise app.UsageError("--config, --workdir and --kind are required")
  config = a.config
  data_dir = run_lib.synthesize(config.synth)
  with open(os.path.join(data_dir, "train.json")) as f:
    keep = select(json.load(f), a.kind, a.category)
  where = f"{a.kind!r}" + (f" in {a.category}" if a.category else "")
  if not keep:
    raise app.UsageError(f"no training record of kind {where} in {data_dir}")
  subset = os.path.join(data_dir, f"train_kind_{a.kind}_{a.category or 'all'}.json")
  with open(subset, "w") as f:
    json.dump(keep, f)
  print(f"{len(keep)} training records of kind {where} -> {subset}", flush=True)
  config.num_steps = a.steps
  config.stages = (("one_kind", (), 1.0, {"data.seq_len": 128, "data.paths": (subset,)}),)
  run_lib.run(config, a.workdir, export=False)
  print(f"\nthe same run on its {len(keep)} training records:")
  run_eval(os.path.abspath(a.workdir), data=subset, write=False)


if __name__ == "__main__":
  app.run(main)
