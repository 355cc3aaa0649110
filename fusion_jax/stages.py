"""Training stages (docs/model.md §10): one mechanism for the main job (config.stages,
fusion_jax.run) and the paper recipe (experiments/fusion_*.py, fusion_jax.task.fusion.STAGES).

A stage is a name, the dotted config keys it sets (its data, batch, learning rates, max
length, steps, ...) and the stage whose weights it starts from. Its config is the job's config
with those keys set (ml_collections' override path: fusion_jax.config_util.with_overrides) and
init_from = the previous stage's workdir (the job's own init_from for a stage without one):
each stage starts from the previous stage's weights with a fresh optimizer.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections

from fusion_jax.config_util import with_overrides


@dataclasses.dataclass(frozen=True)
class Stage:
  """One training stage.

  Attributes:
    name: the stage's name (its workdir is named after it).
    overrides: {dotted config key: this stage's value}, e.g. {"data.seq_len": 128}; every key
      must exist in the job's config.
    previous: the stage whose final weights this one starts from ('' = config.init_from).
  """
  name: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  previous: str = ""


def stage_config(config: ml_collections.ConfigDict, stage: Stage, init_from: str,
                 where: str = "") -> ml_collections.ConfigDict:
  """`config` with the stage's overrides set and init_from (a copy; unknown keys raise
  ValueError naming `where`, default "stage <name>")."""
  c = with_overrides(config, stage.overrides, where or f"stage {stage.name!r}")
  c.init_from = init_from
  return c


def plan(config: ml_collections.ConfigDict, stages: Sequence[Stage],
         workdir_of: Callable[[str], str], where: Callable[[int, Stage], str] | None = None
         ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
  """[(name, config, workdir)] of `stages` in order: workdir_of(name) is each stage's run
  directory, and a stage with `previous` starts from workdir_of(previous)."""
  names = [s.name for s in stages]
  out = []
  for i, s in enumerate(stages):
    if s.previous and s.previous not in names:
      raise ValueError(f"stage {s.name!r} starts from unknown stage {s.previous!r}; "
                       f"stages: {names}")
    init_from = workdir_of(s.previous) if s.previous else str(config.get("init_from") or "")
    c = stage_config(config, s, init_from, where(i, s) if where else "")
    out.append((s.name, c, workdir_of(s.name)))
  return out
