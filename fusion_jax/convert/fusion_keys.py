"""Torch <-> Flax key table of the FUSION interaction layers (docs/model.md §14).

One table drives both directions. Torch keys live under
`model.vision_sampler_layers.{j}.layers.0.`; the Flax side is the parameter tree of
fusion_jax.models.interaction.InteractionLayer. torch Linear weights are (out, in), Flax
kernels (in, out); LayerNorm weight/bias map to scale/bias unchanged.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

INTERACTION_PREFIX = "model.vision_sampler_layers."

# (torch suffix, flax path, kind, torch shape in units of D)
#   kind "linear": torch (out, in) <-> kernel (in, out); "norm": copied as is.
_INTERACTION_TABLE: tuple[tuple[str, tuple[str, ...], str, tuple[int, ...]], ...] = (
    ("proj_in.weight", ("proj_in", "kernel"), "linear", (1, 2)),
    ("proj_context.weight", ("proj_context", "kernel"), "linear", (1, 1)),
    *(entry for p in ("q", "k", "v") for entry in (
        (f"cross_attn.{p}_proj.0.weight", ("cross_attn", f"{p}_proj_norm", "scale"), "norm", (1,)),
        (f"cross_attn.{p}_proj.0.bias", ("cross_attn", f"{p}_proj_norm", "bias"), "norm", (1,)),
        (f"cross_attn.{p}_proj.1.weight", ("cross_attn", f"{p}_proj", "kernel"), "linear", (1, 1)),
    )),
    ("cross_attn.o_proj.weight", ("cross_attn", "o_proj", "kernel"), "linear", (1, 1)),
    ("norm.weight", ("norm", "scale"), "norm", (1,)),
    ("norm.bias", ("norm", "bias"), "norm", (1,)),
    ("proj_out.linear_1.weight", ("proj_out", "linear_1", "kernel"), "linear", (1, 1)),
    ("proj_out.linear_2.weight", ("proj_out", "linear_2", "kernel"), "linear", (1, 1)),
)


def interaction_torch_keys(j: int, prefix: str = INTERACTION_PREFIX) -> list[str]:
  """All torch keys of interaction layer j, in table order."""
  return [f"{prefix}{j}.layers.0.{suffix}" for suffix, *_ in _INTERACTION_TABLE]


def _torch_shape(units: tuple[int, ...], d: int) -> tuple[int, ...]:
  return tuple(u * d for u in units)


def interaction_params_from_torch(get_tensor: Callable[[str], np.ndarray], j: int,
                                  prefix: str = INTERACTION_PREFIX) -> dict[str, Any]:
  """Reads interaction layer j from torch tensors into an InteractionLayer param tree.

  Args:
    get_tensor: key -> numpy array (e.g. SafetensorsReader(dir).get).
    j: interaction layer index.
    prefix: key prefix before the layer index.

  Returns:
    Nested dict of numpy arrays (plain, unboxed), the `params` of InteractionLayer.
  """
  base = f"{prefix}{j}.layers.0."
  d = None
  params: dict[str, Any] = {}
  for suffix, path, kind, units in _INTERACTION_TABLE:
    key = base + suffix
    t = np.asarray(get_tensor(key))
    if d is None:  # proj_in.weight (D, 2D) comes first and fixes D
      if t.ndim != 2 or t.shape[1] != 2 * t.shape[0]:
        raise ValueError(f"fusion_keys: {key} has shape {t.shape}, expected (D, 2D); "
                         "is this a FUSION checkpoint with interaction layers?")
      d = t.shape[0]
    want = _torch_shape(units, d)
    if t.shape != want:
      raise ValueError(f"fusion_keys: {key} has shape {t.shape}, expected {want} for width "
                       f"D={d} (from {base}proj_in.weight); the checkpoint is inconsistent.")
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(t.T) if kind == "linear" else t
  return params


def interaction_tensors_to_torch(params: Mapping[str, Any], j: int,
                                 prefix: str = INTERACTION_PREFIX
                                 ) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, numpy array) for interaction layer j from an InteractionLayer tree.

  Args:
    params: the layer's params (plain or nn.Partitioned-boxed leaves, jax or numpy arrays).
    j: interaction layer index.
    prefix: key prefix before the layer index.
  """
  # Strip Partitioned boxes by value (nn.meta.unbox would add sharding constraints under a
  # mesh context, which a host-side export must not do).
  params = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                        params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  base = f"{prefix}{j}.layers.0."

  def leaf(path: tuple[str, ...]) -> np.ndarray:
    node: Any = params
    for name in path:
      if not isinstance(node, Mapping) or name not in node:
        raise KeyError(f"fusion_keys: interaction params lack {'/'.join(path)} "
                       f"(needed for {base}...); pass the InteractionLayer `params` subtree.")
      node = node[name]
    return np.asarray(jax.device_get(node))

  d = leaf(("proj_context", "kernel")).shape[0]
  for suffix, path, kind, units in _INTERACTION_TABLE:
    a = leaf(path)
    t = np.ascontiguousarray(a.T) if kind == "linear" else a
    want = _torch_shape(units, d)
    if t.shape != want:
      raise ValueError(f"fusion_keys: param {'/'.join(path)} has shape {a.shape}, which gives "
                       f"{base + suffix} shape {t.shape}, expected {want} for D={d}.")
    yield base + suffix, t
