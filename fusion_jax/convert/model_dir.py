"""The fusion_jax model directory: what conversion writes and training starts from.

  MODEL_DIR/
    fusion_config.json   FusionConfig.to_dict() (FusionConfig.from_dict reads it back)
    params/              orbax StandardCheckpointer save of the plain (unboxed) param tree
    meta.json            optional: provenance (source paths, original torch / HF configs)
    tokenizer/           optional: the tokenizer files the model was trained with

  save_model_dir(dir, params, cfg, extra_meta=None)
  params, cfg = load_model_dir(dir, shardings=None, dtype=None)

Restoring with `shardings` (one Sharding for every leaf, or a tree of them matching the params)
reads each array straight into its target layout, so a model larger than one device never
lands whole on one device; without shardings the arrays go to the host CPU device.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

# The model is imported only where a config is read or written: is_model_dir (the trainer's
# init_from) loads no model code.
if TYPE_CHECKING:
  from fusion_jax.models.fusion import FusionConfig

CONFIG_NAME = "fusion_config.json"
PARAMS_NAME = "params"
META_NAME = "meta.json"
TOKENIZER_NAME = "tokenizer"


def is_model_dir(directory: str) -> bool:
  """Whether `directory` (local or gs://...) holds CONFIG_NAME and PARAMS_NAME/ (what the
  trainer's init_from and inference accept as a model dir)."""
  d = epath.Path(directory)
  return (d / CONFIG_NAME).is_file() and (d / PARAMS_NAME).is_dir()


def _check_model_dir(directory: str) -> None:
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no such directory (expected a fusion_jax model dir "
                            f"with {CONFIG_NAME} and {PARAMS_NAME}/)")
  if not is_model_dir(directory):
    present = sorted(os.listdir(directory))[:10]
    raise ValueError(
        f"{directory} is not a fusion_jax model dir: it needs {CONFIG_NAME} and {PARAMS_NAME}/ "
        f"(found {present}). Model dirs are written by fusion_jax.convert.import_torch, "
        "fusion_jax.convert.import_hf or save_model_dir.")


def save_model_dir(directory: str, params: Any, cfg: FusionConfig,
                   extra_meta: Mapping[str, Any] | None = None) -> None:
  """Writes `cfg` and `params` (numpy or jax leaves, boxed or not) and waits for completion.

  The directory may exist but must not already hold params/ (never silently overwritten).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(os.path.join(directory, PARAMS_NAME)):
    raise FileExistsError(f"{directory}/{PARAMS_NAME} exists; choose a new model directory")
  os.makedirs(directory, exist_ok=True)
  from fusion_jax.convert.fusion_torch import unbox
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(directory, PARAMS_NAME), unbox(params))
  ckptr.wait_until_finished()
  # The config goes last: its presence marks a complete model dir.
  if extra_meta:
    with open(os.path.join(directory, META_NAME), "w") as f:
      json.dump(dict(extra_meta), f, indent=1, default=str)
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(cfg.to_dict(), f, indent=1)


def load_model_config(directory: str) -> FusionConfig:
  """The FusionConfig of a model dir (no tensors read)."""
  from fusion_jax.models.fusion import FusionConfig
  _check_model_dir(directory)
  with open(os.path.join(directory, CONFIG_NAME)) as f:
    return FusionConfig.from_dict(json.load(f))


def load_model_meta(directory: str) -> dict[str, Any]:
  """meta.json of a model dir ({} when absent)."""
  path = os.path.join(directory, META_NAME)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def load_model_dir(directory: str, *, shardings: Any = None, dtype: Any = None
                   ) -> tuple[Any, FusionConfig]:
  """(params, cfg) of a model dir; params are jax arrays in a plain nested dict.

  Args:
    shardings: None (host CPU device), a single jax Sharding for every leaf, or a tree of
      Shardings with the params' structure (e.g. fusion_jax.parallel.sharding.param_shardings).
    dtype: cast every leaf while restoring (e.g. jnp.bfloat16); None keeps the stored dtype.
  """
  cfg = load_model_config(directory)
  path = os.path.join(os.path.abspath(directory), PARAMS_NAME)
  ckptr = ocp.StandardCheckpointer()
  stored = ckptr.metadata(path).item_metadata.tree
  if shardings is None:
    shardings = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, stored)
  try:
    target = jax.tree.map(
        lambda m, s: jax.ShapeDtypeStruct(m.shape, np.dtype(dtype or m.dtype), sharding=s),
        stored, shardings)
  except ValueError as e:
    raise ValueError(f"{directory}: the shardings tree does not match the stored params tree: "
                     f"{e}") from e
  return ckptr.restore(path, target), cfg
