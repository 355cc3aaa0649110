"""FUSION parameter trees in the unrolled and the scanned layout, and the conversion between them.

The unrolled layout is the canonical, interchange one (every converter reads and writes it;
fusion_jax/convert): `llm/layers_{i}`, `interaction_{j}`, `vision_tower/layers_{i}`. With
`scan_layers` (LLMConfig and VisionConfig) the model stacks layers on a leading axis:

  vision_tower/layers/...              (L', ...)           one scan over the tower
  llm/layers/...                       (L, ...)            no interaction layers in the stack
  llm/head/layers/...                  (n0, ...)           layers 0..start  } interaction layers
  llm/head/block/...                   (...)               interaction_0    } inside the stack
  llm/groups/layers/...                (G, stride, ...)    the next G*stride layers
  llm/groups/block/...                 (G, ...)            interaction_1..G
  llm/tail/...                         (nt, ...)           the layers after the last one

(fusion_jax.models.llm.layer_plan gives n0, G, stride, nt.) `to_config_layout(params, cfg)`
is the one call at every boundary where a tree may come in the other layout (init_from, model
dirs, exports); it is a no-op when the tree already matches. Works on numpy or jax leaves.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.models.fusion import FusionConfig, scanned_interaction_layers
from fusion_jax.models.llm import layer_plan


def _stack(xs: list[Any]) -> Any:
  return jax.tree.map(lambda *a: np.stack(a) if all(isinstance(x, np.ndarray) for x in a)
                      else jnp.stack(a), *xs)


def _unstack(tree: Any) -> list[Any]:
  n = jax.tree.leaves(tree)[0].shape[0]
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def _numbered(tree: Mapping[str, Any], prefix: str) -> list[Any]:
  keys = sorted((k for k in tree if k.startswith(prefix) and k[len(prefix):].isdigit()),
                key=lambda k: int(k[len(prefix):]))
  if [int(k[len(prefix):]) for k in keys] != list(range(len(keys))):
    raise ValueError(f"param_layout: {prefix}N entries are not contiguous from 0: {keys}")
  return [tree[k] for k in keys]


def is_scanned(params: Mapping[str, Any]) -> bool:
  """True when the tree's tower or decoder layers are stacked."""
  return "layers" in params.get("vision_tower", {}) or any(
      k in params.get("llm", {}) for k in ("layers", "head"))


def to_unscanned(params: Mapping[str, Any], cfg: FusionConfig | None = None) -> dict[str, Any]:
  """A scanned tree -> the unrolled layout (a tree already unrolled passes). The segment sizes
  are read from the stacked arrays, so `cfg` is not needed (accepted for symmetry)."""
  del cfg
  out = dict(params)
  tower = dict(out["vision_tower"])
  if "layers" in tower:
    for i, layer in enumerate(_unstack(tower.pop("layers"))):
      tower[f"layers_{i}"] = layer
  out["vision_tower"] = tower
  llm = dict(out["llm"])
  layers: list[Any] = []
  blocks: list[Any] = []
  if "layers" in llm:
    layers = _unstack(llm.pop("layers"))
  elif "head" in llm:
    head = llm.pop("head")
    layers += _unstack(head["layers"])
    blocks.append(head["block"])
    if "groups" in llm:
      for g in _unstack(llm.pop("groups")):
        layers += _unstack(g["layers"])
        blocks.append(g["block"])
    if "tail" in llm:
      layers += _unstack(llm.pop("tail"))
  for i, layer in enumerate(layers):
    llm[f"layers_{i}"] = layer
  out["llm"] = llm
  for j, block in enumerate(blocks):
    out[f"interaction_{j}"] = block
  return out


def to_scanned(params: Mapping[str, Any], cfg: FusionConfig) -> dict[str, Any]:
  """An unrolled tree -> `cfg`'s scanned layout (tower and decoder as cfg says)."""
  out = dict(params)
  if cfg.vision.scan_layers and "layers" not in out["vision_tower"]:
    tower = dict(out["vision_tower"])
    layers = _numbered(tower, "layers_")
    if len(layers) != cfg.vision.num_layers:
      raise ValueError(f"param_layout: {len(layers)} tower layers, config has "
                       f"{cfg.vision.num_layers}")
    tower = {k: v for k, v in tower.items() if not k.startswith("layers_")}
    tower["layers"] = _stack(layers)
    out["vision_tower"] = tower
  llm = dict(out["llm"])
  if cfg.llm.scan_layers and "layers" not in llm and "head" not in llm:
    layers = _numbered(llm, "layers_")
    if len(layers) != cfg.llm.num_layers:
      raise ValueError(f"param_layout: {len(layers)} decoder layers, config has "
                       f"{cfg.llm.num_layers}")
    llm = {k: v for k, v in llm.items() if not k.startswith("layers_")}
    hooks = scanned_interaction_layers(cfg)
    blocks = _numbered(out, "interaction_")
    if not hooks:
      llm["layers"] = _stack(layers)
    else:
      if len(blocks) != len(hooks):
        raise ValueError(f"param_layout: {len(blocks)} interaction layers in the tree, config "
                         f"runs {len(hooks)}")
      plan = layer_plan(cfg.llm.num_layers, hooks)
      llm["head"] = {"layers": _stack(layers[:plan.head]), "block": blocks[0]}
      n = plan.head
      if plan.groups:
        groups = []
        for g in range(plan.groups):
          groups.append({"layers": _stack(layers[n:n + plan.stride]), "block": blocks[g + 1]})
          n += plan.stride
        llm["groups"] = _stack(groups)
      if plan.tail:
        llm["tail"] = _stack(layers[n:])
      out = {k: v for k, v in out.items() if not k.startswith("interaction_")}
  out["llm"] = llm
  return out


def to_config_layout(params: Mapping[str, Any], cfg: FusionConfig) -> dict[str, Any]:
  """`params` (either layout) in the layout `cfg` builds: the one boundary conversion."""
  plain = to_unscanned(params, cfg) if is_scanned(params) else dict(params)
  if cfg.llm.scan_layers or cfg.vision.scan_layers:
    return to_scanned(plain, cfg)
  return plain
