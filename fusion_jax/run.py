r"""The main job: synthesize -> tokenizer -> train -> evaluate -> sample answers -> export.

  python -m fusion_jax.run --config experiments/smoke.py --workdir runs/smoke

Each stage is skipped when its output exists (the dataset and tokenizer are cached by their
parameters; training resumes from the newest checkpoint), so rerunning a finished or
interrupted job continues it. Writes <workdir>/summary.json and prints a summary table.

This module is the recipe; each step is a small module of fusion_jax/main_job/.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from fusion_jax.main_job import export as export_lib
from fusion_jax.main_job import say
from fusion_jax.main_job import summary as summary_lib
from fusion_jax.main_job.evaluate import plot_job, sample_answers
# The steps by name (benchmarks/ and tests call them as fusion_jax.run.<step>).
from fusion_jax.main_job.prepare import dataset_dir, prepare, synthesize  # noqa: F401
from fusion_jax.main_job.stages import stage_plan
from fusion_jax.main_job.summary import (ACCURACY_TARGET, CHANCE_MULTIPLE,  # noqa: F401
                                         check_targets, target_of)
from fusion_jax.main_job.train import check_plan, train_stages
from fusion_jax.train import preflight

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "experiment config (experiments/smoke.py)")
flags.DEFINE_string("workdir", None, "run directory (checkpoints, metrics, eval, export)")
flags.DEFINE_boolean("export", True, "export the final weights with export_torch")
flags.DEFINE_boolean("verbose", False, "show the traceback behind each configuration error")


def run(config: ml_collections.ConfigDict, workdir: str, *, export: bool = True) -> dict[str, Any]:
  """The whole job; returns (and writes) the summary."""
  t0 = time.time()
  workdir = os.path.abspath(workdir)
  times: dict[str, float] = {}

  def timed(name: str, fn, *args, **kw):
    t = time.time()
    out = fn(*args, **kw)
    times[name] = time.time() - t
    return out

  # The config before minutes of synthesis (its data is filled in by prepare), then each stage
  # with its data.
  preflight.require(config, workdir, data=False, init_from=False)
  config = timed("data+tokenizer", prepare, config, workdir)
  plan = stage_plan(config, workdir)
  check_plan(plan)
  os.makedirs(workdir, exist_ok=True)
  stage_runs, train_summary = train_stages(plan, timed, t0)
  if train_summary.get("preempted"):
    say("preempted: checkpoint saved; rerun the same command to continue")
    return {"preempted": True, "stages": stage_runs, "train": train_summary}

  from fusion_jax.eval.evaluate import run_eval
  ev = timed("eval", run_eval, workdir, split=config.eval.split,
             batch_size=int(config.eval.batch_size))
  samples = timed("samples", sample_answers, workdir, ev["data"])
  plots = plot_job(plan, ev["categories"],
                   {c: target_of(c, r["chance"]) for c, r in ev["categories"].items()},
                   workdir, config.eval.split)
  out = export_lib.export_dir(config, workdir)
  note = timed("export", export_lib.export, workdir, out) if export else None
  summary = summary_lib.summarize(
      config, workdir, wall_time_s=time.time() - t0, times=times, stage_runs=stage_runs,
      train_summary=train_summary, ev=ev, samples=samples, export_note=note, plots=plots,
      export_dir=out if export else None)
  summary_lib.write(summary)
  return summary


def main(argv) -> None:
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  logging.set_verbosity(logging.INFO)
  # Progress lines come from the trainer's logger; orbax's INFO chatter is noise here.
  from fusion_jax.train.checkpoint import quiet_orbax_logs
  quiet_orbax_logs()
  try:
    summary = run(FLAGS.config, FLAGS.workdir, export=FLAGS.export)
  except preflight.ConfigError as e:
    sys.exit(preflight.report(e, "fusion_jax.run", FLAGS.verbose))
  sys.exit(0 if summary else 1)


if __name__ == "__main__":
  app.run(main)
