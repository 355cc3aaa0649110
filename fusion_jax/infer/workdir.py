"""Read a FUSION training run back: its config, its FusionConfig, its newest parameters.

Evaluation and export take a training workdir as well as a model dir (fusion_jax.convert.
model_dir); this is the one place that knows how a run dir stores both.
"""
from __future__ import annotations

import json
import os
from typing import Any

from etils import epath
import jax
import ml_collections

from fusion_jax.models import fusion
from fusion_jax.train import checkpoint as ckpt_lib
from fusion_jax.train.init_from import restore_params


def checkpoint_steps(workdir: str) -> list[int]:
  """Sorted steps of a run's complete checkpoints ([] when there is none)."""
  root = ckpt_lib.checkpoint_dir(workdir)
  if not epath.Path(root).is_dir():  # epath: gs:// run dirs too
    return []
  return ckpt_lib.finalized_steps(root)


def latest_step(workdir: str) -> int:
  """Newest complete checkpoint step of a run; a clear error when there is none."""
  steps = checkpoint_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"{workdir}: no complete checkpoint under "
                            f"{ckpt_lib.checkpoint_dir(workdir)}; is this a "
                            "training workdir (python -m fusion_jax.train --workdir ...)?")
  return max(steps)


def run_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The experiment config saved with checkpoint `step` (default the newest)."""
  step = latest_step(workdir) if step is None else step
  path = epath.Path(ckpt_lib.checkpoint_dir(workdir)) / str(step) / "config" / "metadata"
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def fusion_config_of(config: ml_collections.ConfigDict) -> fusion.FusionConfig:
  """The FusionConfig a FUSION run trained (config.model + its compute dtype / remat)."""
  from fusion_jax.task.fusion import fusion_config_from
  if config.get("task") != "fusion":
    raise ValueError(f"run config task is {config.get('task')!r}, not 'fusion'")
  return fusion_config_from(config.model, config.get("compute_dtype"), config.get("remat_policy"))


def load_run(workdir: str, step: int | None = None
             ) -> tuple[Any, fusion.FusionConfig, ml_collections.ConfigDict, int]:
  """(params on the default device, FusionConfig, experiment config, step) of a run."""
  workdir = os.path.abspath(workdir) if "://" not in workdir else workdir  # orbax: absolute
  step = latest_step(workdir) if step is None else step
  config = run_config(workdir, step)
  cfg = fusion_config_of(config)
  batch = fusion.init_batch(cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.eval_shape(lambda: fusion.Fusion(cfg).init(jax.random.key(0), batch))["params"]
  import flax.linen as nn
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                        nn.meta.unbox(abstract))
  params, _ = restore_params(os.path.join(ckpt_lib.checkpoint_dir(workdir), str(step)), target)
  return params, cfg, config, step
