"""The main job's training stages: config.stages as fusion_jax.stages.Stage, each on its
categories of the dataset (a subset file next to it, written once)."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from fusion_jax import stages as stages_lib


def _subset(records: list[dict[str, Any]], data_file: str, name: str,
            categories: Sequence[str]) -> str:
  """<data dir>/train_<name>_<digest of the categories>.json: the records of `categories`
  (written once; the digest keeps a stage whose categories change from reading a stale file)."""
  digest = hashlib.sha256(json.dumps(sorted(categories)).encode()).hexdigest()[:8]
  subset = os.path.join(os.path.dirname(data_file), f"train_{name}_{digest}.json")
  if not os.path.isfile(subset):
    keep = [r for r in records if r.get("category") in set(categories)]
    if not keep:
      raise ValueError(f"stage {name!r}: no training record of categories {categories}")
    with open(subset + ".tmp", "w") as f:
      json.dump(keep, f)
    os.replace(subset + ".tmp", subset)
  return subset


def stage_plan(config: ml_collections.ConfigDict, workdir: str
               ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
  """[(name, config, workdir)] of the training stages (docs/model.md §10: each starts from the
  previous stage's weights with a fresh optimizer). config.stages = ((name, categories, step
  fraction [, overrides]), ...), categories () = all; overrides maps dotted config keys to this
  stage's values (docs/model.md §10 gives each stage its own max length, batch and learning
  rates), e.g. {"data.seq_len": 128}. The last stage trains in `workdir` itself, earlier ones in
  <workdir>/stages/<name>. Without config.stages: one stage on all data."""
  rows = tuple(config.get("stages") or (("all", (), 1.0),))
  data_file = config.data.paths[0]
  with open(data_file) as f:
    records = json.load(f)
  stages, previous = [], ""
  for i, row in enumerate(rows):
    if len(row) not in (3, 4):
      raise ValueError(f"config.stages[{i}] = {row!r}: expected (name, categories, step "
                       "fraction) or (name, categories, step fraction, {dotted key: value})")
    name, categories, frac = row[:3]
    overrides = {"num_steps": max(1, int(round(float(frac) * int(config.num_steps))))}
    overrides.update(dict(row[3] if len(row) == 4 else {}))
    if categories:
      overrides["data.paths"] = (_subset(records, data_file, name, categories),)
    stages.append(stages_lib.Stage(name, overrides, previous))
    previous = name
  last = rows[-1][0]
  return stages_lib.plan(
      config, stages,
      lambda name: workdir if name == last else os.path.join(workdir, "stages", name),
      where=lambda i, s: f"config.stages[{i}] ({s.name!r})")
