"""Startup checks of a FUSION run (FusionTask.preflight, run by fusion_jax.train.preflight).

The model (preset + overrides) and, unless the data is filled in later, the data config, the
data source (every file of data.paths, the mixture YAML and every file it lists,
tfds_data_dir), image_root and the tokenizer and its size against the model vocabulary. Each
problem is one line on `c` naming the config key, the value and the fix.
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections

from fusion_jax.train import preflight


def _check_paths(c: preflight.Checks, paths: Any) -> None:
  from fusion_jax.data.sources import expand_arrayrecord_paths
  for p in ([paths] if isinstance(paths, str) else list(paths)):
    if not c.usable_path("data.paths", p):
      continue
    if p.endswith((".json", ".jsonl")):
      if not preflight.exists(p):
        c.add(f"config.data.paths: {p} not found (a LLaVA .json / .jsonl file)")
    else:
      c.run("config.data.paths", expand_arrayrecord_paths, p)


def _check_data(c: preflight.Checks, data: ml_collections.ConfigDict) -> None:
  """The data source, image_root: every file named exists (the model is not needed)."""
  from fusion_jax.data import mixture as mixture_lib
  paths, mixture = data.get("paths") or (), data.get("mixture") or ""
  tfds_name = data.get("tfds_name") or ""
  image_root = data.get("image_root") or ""
  if not (paths or mixture or tfds_name):
    c.add("config.data: no data; set --config.data.paths=FILE.json (or .jsonl / ArrayRecord), "
          "--config.data.mixture=MIX.yaml or --config.data.tfds_name=NAME")
  if paths:
    _check_paths(c, paths)
  if mixture and c.usable_path("data.mixture", mixture):
    # Every entry's file is resolved (relative to the YAML's folder) and must exist.
    c.run("config.data.mixture", mixture_lib.parse_mixture, mixture, image_root)
  tfds_dir = data.get("tfds_data_dir") or ""
  if tfds_name and tfds_dir and c.usable_path("data.tfds_data_dir", tfds_dir):
    if not preflight.exists(tfds_dir):
      c.add(f"config.data.tfds_data_dir: {tfds_dir} does not exist")
  if image_root and c.usable_path("data.image_root", image_root):
    if not preflight.exists(image_root):
      c.add(f"config.data.image_root: {image_root} does not exist; relative image paths of "
            "the records resolve against it")
    elif "://" not in image_root and not os.path.isdir(image_root):
      c.add(f"config.data.image_root: {image_root} is not a directory")


def check(c: preflight.Checks, config: ml_collections.ConfigDict, data: bool) -> None:
  """FusionTask.preflight: the model (preset + overrides) and, with `data`, the data side."""
  from fusion_jax.task.fusion import FusionTask  # imports this module
  task = c.run("config.model", FusionTask, config)
  if not data:
    return
  _check_data(c, config.data)
  tok = config.data.get("tokenizer") or ""
  if task is not None and (not tok or c.usable_path("data.tokenizer", tok)):
    # Loads it once: the file exists, is a tokenizer, and fits the model vocabulary.
    c.run("config.data.tokenizer", lambda: task.tokenizer)
  if task is not None:
    import jax
    c.run("config.data", task.data_config, jax.process_count())
