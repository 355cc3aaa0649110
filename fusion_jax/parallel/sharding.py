"""Device mesh and logical-axis sharding rules (MaxText style).

Every parameter and key activation carries logical axis names; a rule table from the config
maps them to mesh axes. Logical names used across fusion_jax:

  batch      examples in a batch                length     sequence positions
  embed      model width (LLM D or vision Dv)   mlp        MLP hidden width
  heads      query heads                         kv_heads   key/value heads
  head_dim   per-head width                      vocab      vocabulary
  norm       normalisation scales / biases       layers     stacked (scanned) layers
  patch      patch-embedding input (p*p*3)       pos        learned position table rows
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# (logical name, mesh axis or axes or None). First matching rule wins.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("patch", None),
    ("pos", None),
)

Rules = Sequence[tuple[str, Any]]


def mesh_axes_of(axes: Any) -> tuple[str, ...]:
  """One rule's mesh axes as a tuple: None -> (), 'fsdp' -> ('fsdp',), a list -> a tuple."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def normalize_rules(rules: Iterable[Sequence[Any]]) -> list[tuple[str, Any]]:
  """Config rules as Linen expects them: (name, None | 'axis' | ('a', 'b')) pairs, mesh-axis
  lists (a config read back from JSON) turned into tuples."""
  return [(name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
          for name, axes in rules]


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills one -1 entry with the remaining devices; checks the product.

  Raises ValueError with the offending sizes when the mesh does not cover the devices.
  """
  sizes = dict(shape)
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {sizes}")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if known <= 0 or num_devices % known:
    raise ValueError(
        f"mesh: axis sizes {sizes} do not divide the {num_devices} devices; "
        "set the sizes so their product equals the device count (one may be -1).")
  if unknown:
    sizes[unknown[0]] = num_devices // known
  if int(np.prod(list(sizes.values()))) != num_devices:
    raise ValueError(
        f"mesh: product of axis sizes {sizes} != {num_devices} devices; "
        "fix mesh sizes (one may be -1 to take the rest).")
  return sizes


def make_mesh(shape: Mapping[str, int] | None = None,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """Mesh over `devices` (default: all) with Auto axis types (Linen partitioning needs them).

  `shape` maps mesh axis names to sizes, e.g. {"data": 2, "fsdp": -1, "tensor": 1}.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {"data": 1, "fsdp": -1, "tensor": 1})
  sizes = resolve_mesh_shape(shape, len(devices))
  names = tuple(sizes)
  dims = tuple(sizes[n] for n in names)
  auto = (jax.sharding.AxisType.Auto,) * len(names)
  # TPU devices (also a topology's, compiled for from a CPU host by fusion_jax.aot): jax orders
  # them along the torus, as on the slice itself; collectives are compiled for that order.
  if len(devices) == len(jax.devices()) or devices[0].platform == "tpu":
    return jax.make_mesh(dims, names, axis_types=auto, devices=devices)
  arr = np.asarray(devices).reshape(dims)
  return jax.sharding.Mesh(arr, names, axis_types=auto)


def logical_to_sharding(logical_tree: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """Tree of PartitionSpecs with logical names -> tree of NamedShardings on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_tree, mesh, list(rules))


def param_shardings(abstract_variables: Any, mesh: jax.sharding.Mesh, rules: Rules = DEFAULT_RULES):
  """NamedShardings for a (possibly abstract) variable tree whose leaves are nn.Partitioned."""
  return logical_to_sharding(nn.get_partition_spec(abstract_variables), mesh, rules)


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint on an activation; a no-op outside a mesh/rules context."""
  return nn.with_logical_constraint(x, names)
