"""The main job's training stages: config.stages as fusion_jax.stages.Stage, each on its
categories of the dataset (a subset file next to it, written once)."""
from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from fusion_jax import stages as stages_lib


def _subset(records: list[dict[str, Any]], data_file: str, name: str,
            share: dict[str, float]) -> str:
  """<data dir>/train_<name>_<digest of share>.json: for each category of `share` the first
  ceil(fraction x its count) of its records, in file order (written once; the digest keeps a
  stage whose categories change from reading a stale file)."""
  digest = hashlib.sha256(json.dumps(sorted(share.items())).encode()).hexdigest()[:8]
  subset = os.path.join(os.path.dirname(data_file), f"train_{name}_{digest}.json")
  if not os.path.isfile(subset):
    total = collections.Counter(r.get("category") for r in records)
    quota = {c: math.ceil(f * total[c]) for c, f in share.items()}
    taken: collections.Counter = collections.Counter()
    keep = []
    for r in records:
      c = r.get("category")
      if taken[c] < quota.get(c, 0):
        taken[c] += 1
        keep.append(r)
    if not keep:
      raise ValueError(f"stage {name!r}: no training record of categories {sorted(share)}")
    with open(subset + ".tmp", "w") as f:
      json.dump(keep, f)
    os.replace(subset + ".tmp", subset)
  return subset


def _share(categories: Any, where: str) -> dict[str, float]:
  """A stage's categories: names (all their records) or {name: fraction of its records}."""
  if hasattr(categories, "items"):
    share = {str(k): float(v) for k, v in categories.items()}
  else:
    share = {str(c): 1.0 for c in categories}
  bad = sorted(k for k, v in share.items() if not 0.0 < v <= 1.0)
  if bad:
    raise ValueError(f"{where}: the record fraction of {bad} must be in (0, 1]")
  return share


def stage_plan(config: ml_collections.ConfigDict, workdir: str
               ) -> list[tuple[str, ml_collections.ConfigDict, str]]:
  """[(name, config, workdir)] of the training stages (docs/model.md §10: each starts from the
  previous stage's weights with a fresh optimizer). config.stages = ((name, categories, step
  fraction [, overrides]), ...), categories () = all; overrides maps dotted config keys to this
  stage's values (docs/model.md §10 gives each stage its own max length, batch and learning
  rates), e.g. {"data.seq_len": 128}; categories may also map names to the fraction of each
  one's records the stage keeps, e.g. {"SynthColor": 0.25, "SynthCount": 1.0}, to give a quickly
  learned category less of the stage. The last stage trains in `workdir` itself, earlier ones in
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
      share = _share(categories, f"config.stages[{i}] ({name!r})")
      overrides["data.paths"] = (_subset(records, data_file, name, share),)
    stages.append(stages_lib.Stage(name, overrides, previous))
    previous = name
  last = rows[-1][0]
  return stages_lib.plan(
      config, stages,
      lambda name: workdir if name == last else os.path.join(workdir, "stages", name),
      where=lambda i, s: f"config.stages[{i}] ({s.name!r})")
