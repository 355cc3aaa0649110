"""The main job's training: its planned stages in order, each resuming from its own newest
checkpoint, with a job ETA after each stage."""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ml_collections

from fusion_jax.main_job import say

SUMMARY_KEYS = ("step", "num_steps", "resumed_from", "checkpoint_step", "nonfinite_total")


def check_plan(plan: list[tuple[str, ml_collections.ConfigDict, str]]) -> None:
  """Every stage's config with its data (preflight); a stage after the first starts from the
  previous one's (future) workdir, so only the first one's init_from must exist now."""
  from fusion_jax.train import preflight
  problems = [p for i, (_, c, d) in enumerate(plan)
              for p in preflight.check(c, d, init_from=i == 0)]
  if problems:
    raise preflight.ConfigError(problems)


def train_stages(plan: list[tuple[str, ml_collections.ConfigDict, str]],
                 timed: Callable[..., Any], t0: float
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Trains the stages of `plan` (timed as "train:<name>"); returns (one row per trained stage,
  the last trainer summary). Stops after a preempted stage (its summary has "preempted")."""
  from fusion_jax.train.loop import train
  stage_runs: list[dict[str, Any]] = []
  train_summary: dict[str, Any] = {}
  for i, (name, stage_config, stage_dir) in enumerate(plan):
    say(f"stage {i + 1}/{len(plan)} '{name}': {stage_config.num_steps} steps of batch "
        f"{stage_config.global_batch} on {stage_config.data.paths[0]} in {stage_dir}"
        + (f", starting from {stage_config.init_from}" if stage_config.init_from else ""))
    t = time.time()
    train_summary = timed(f"train:{name}", train, stage_config, stage_dir)
    stage_runs.append({"stage": name, "workdir": stage_dir,
                       **{k: train_summary.get(k) for k in SUMMARY_KEYS}})
    if train_summary.get("preempted"):
      return stage_runs, train_summary
    left = sum(int(c.num_steps) for _, c, _ in plan[i + 1:])
    if left:
      # This stage's time per step (compile included) for the later stages, plus eval (~1 min).
      per_step = (time.time() - t) / max(1, int(stage_config.num_steps))
      say(f"job ETA: ~{(left * per_step + 60) / 60:.0f} min more ({left} steps at "
          f"{per_step:.2f} s/step, then eval, sample answers, export); "
          f"{(time.time() - t0) / 60:.1f} min so far")
  return stage_runs, train_summary
