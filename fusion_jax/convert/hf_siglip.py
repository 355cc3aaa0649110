"""SigLIP tower weights: transformers (torch) <-> fusion_jax VisionTower, both directions.

One key table (`_key_table`) drives import and export so the two directions cannot disagree.
Torch keys are relative to a prefix: '' for a transformers-5 SiglipVisionModel directory,
'vision_model.' for a SiglipModel (and older SiglipVisionModel saves), and
'model.vision_tower.vision_tower.vision_model.' inside a FUSION checkpoint (docs/model.md §14).

  torch key (after prefix)                      flax path                                  transform
  embeddings.patch_embedding.weight (Dv,3,p,p)  embeddings/patch_embedding/kernel (p,p,3,Dv)  conv
  embeddings.patch_embedding.bias (Dv,)         embeddings/patch_embedding/bias               copy
  embeddings.position_embedding.weight (N,Dv)   embeddings/position_embedding (N,Dv)          copy
  encoder.layers.{i}.layer_norm{1,2}.weight     layers_{i}/layer_norm{1,2}/scale              copy
  encoder.layers.{i}.layer_norm{1,2}.bias       layers_{i}/layer_norm{1,2}/bias               copy
  encoder.layers.{i}.self_attn.{q,k,v}_proj.weight (Dv,Dv)  .../kernel (Dv,heads,hd)          heads_in
  encoder.layers.{i}.self_attn.{q,k,v}_proj.bias (Dv,)      .../bias (heads,hd)               heads_bias
  encoder.layers.{i}.self_attn.out_proj.weight (Dv,Dv)      .../kernel (heads,hd,Dv)          heads_out
  encoder.layers.{i}.self_attn.out_proj.bias (Dv,)          .../bias (Dv,)                    copy
  encoder.layers.{i}.mlp.fc1.weight (F,Dv) / fc2 (Dv,F)     layers_{i}/mlp/fc{1,2}/kernel      linear
  encoder.layers.{i}.mlp.fc{1,2}.bias                       layers_{i}/mlp/fc{1,2}/bias        copy
  post_layernorm.{weight,bias}                  post_layernorm/{scale,bias}                   copy

The pooling head (`head.*`) and any layers beyond `num_layers` are never read.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from flax.core import meta

from fusion_jax.convert.safetensors_io import SafetensorsReader
from fusion_jax.models.vision import SIGLIP2_GIANT_OPT_16_384, SIGLIP_SO400M_14_384, VisionConfig

# transformers' SiglipVisionConfig defaults: hub config.json files written by older versions
# omit fields equal to the default (e.g. layer_norm_eps), so missing fields take these.
_HF_VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    num_channels=3, image_size=224, patch_size=16, hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6)

_KNOWN_TOWERS = (SIGLIP_SO400M_14_384, SIGLIP2_GIANT_OPT_16_384)


def siglip_config_from_hf(cfg_dict: Mapping[str, Any]) -> VisionConfig:
  """transformers SiglipVisionConfig dict (or SiglipConfig dict with `vision_config`) ->
  VisionConfig of the full tower (all num_hidden_layers; apply `fusion_tower` for FUSION)."""
  d = dict(cfg_dict)
  if "vision_config" in d:
    d = dict(d["vision_config"] or {})
  model_type = d.get("model_type", "siglip_vision_model")
  if model_type not in ("siglip_vision_model", "siglip"):
    raise ValueError(
        f"hf_siglip: model_type {model_type!r} is not a SigLIP vision tower; expected a "
        "SiglipVisionConfig or SiglipConfig (SigLIP2 fixed-resolution checkpoints such as "
        "siglip2-giant-opt-patch16-384 are saved as 'siglip'; NaFlex 'siglip2' is not supported)")
  d = {**_HF_VISION_DEFAULTS, **{k: v for k, v in d.items() if v is not None}}
  if d["hidden_act"] != "gelu_pytorch_tanh":
    raise ValueError(f"hf_siglip: hidden_act {d['hidden_act']!r} unsupported; the SigLIP "
                     "block uses 'gelu_pytorch_tanh'")
  if d["num_channels"] != 3:
    raise ValueError(f"hf_siglip: num_channels {d['num_channels']} unsupported (RGB only)")

  def side(v, name):
    if isinstance(v, (list, tuple)):
      if len(v) != 2 or v[0] != v[1]:
        raise ValueError(f"hf_siglip: non-square {name} {v} unsupported")
      v = v[0]
    return int(v)

  return VisionConfig(
      image_size=side(d["image_size"], "image_size"), patch_size=side(d["patch_size"], "patch_size"),
      hidden_size=int(d["hidden_size"]), intermediate_size=int(d["intermediate_size"]),
      num_layers=int(d["num_hidden_layers"]), num_heads=int(d["num_attention_heads"]),
      layer_norm_eps=float(d["layer_norm_eps"]))


# ---------------------------------------------------------------------------------------------
# The key table.

# transform name -> (torch -> flax given cfg, flax -> torch, torch shape given cfg is per entry)
_TO_FLAX: dict[str, Callable[[np.ndarray, VisionConfig], np.ndarray]] = {
    "copy": lambda t, c: t,
    "conv": lambda t, c: t.transpose(2, 3, 1, 0),
    "linear": lambda t, c: t.T,
    "heads_in": lambda t, c: t.T.reshape(c.hidden_size, c.num_heads, c.head_dim),
    "heads_bias": lambda t, c: t.reshape(c.num_heads, c.head_dim),
    "heads_out": lambda t, c: t.T.reshape(c.num_heads, c.head_dim, c.hidden_size),
}
_TO_TORCH: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda p: p,
    "conv": lambda p: p.transpose(3, 2, 0, 1),
    "linear": lambda p: p.T,
    "heads_in": lambda p: p.reshape(p.shape[0], -1).T,
    "heads_bias": lambda p: p.reshape(-1),
    "heads_out": lambda p: p.reshape(-1, p.shape[-1]).T,
}

# (torch suffix, flax path, transform, torch shape from cfg)
_Entry = tuple[str, tuple[str, ...], str, Callable[[VisionConfig], tuple[int, ...]]]


def _dv(c: VisionConfig) -> tuple[int, ...]:
  return (c.hidden_size,)


def _dv2(c: VisionConfig) -> tuple[int, ...]:
  return (c.hidden_size, c.hidden_size)


_EMBED_ENTRIES: tuple[_Entry, ...] = (
    ("embeddings.patch_embedding.weight", ("embeddings", "patch_embedding", "kernel"), "conv",
     lambda c: (c.hidden_size, 3, c.patch_size, c.patch_size)),
    ("embeddings.patch_embedding.bias", ("embeddings", "patch_embedding", "bias"), "copy", _dv),
    ("embeddings.position_embedding.weight", ("embeddings", "position_embedding"), "copy",
     lambda c: (c.num_patches, c.hidden_size)),
)

_LAYER_ENTRIES: tuple[_Entry, ...] = (
    ("layer_norm1.weight", ("layer_norm1", "scale"), "copy", _dv),
    ("layer_norm1.bias", ("layer_norm1", "bias"), "copy", _dv),
    *(entry for p in ("q", "k", "v") for entry in (
        (f"self_attn.{p}_proj.weight", ("self_attn", f"{p}_proj", "kernel"), "heads_in", _dv2),
        (f"self_attn.{p}_proj.bias", ("self_attn", f"{p}_proj", "bias"), "heads_bias", _dv),
    )),
    ("self_attn.out_proj.weight", ("self_attn", "out_proj", "kernel"), "heads_out", _dv2),
    ("self_attn.out_proj.bias", ("self_attn", "out_proj", "bias"), "copy", _dv),
    ("layer_norm2.weight", ("layer_norm2", "scale"), "copy", _dv),
    ("layer_norm2.bias", ("layer_norm2", "bias"), "copy", _dv),
    ("mlp.fc1.weight", ("mlp", "fc1", "kernel"), "linear",
     lambda c: (c.intermediate_size, c.hidden_size)),
    ("mlp.fc1.bias", ("mlp", "fc1", "bias"), "copy", lambda c: (c.intermediate_size,)),
    ("mlp.fc2.weight", ("mlp", "fc2", "kernel"), "linear",
     lambda c: (c.hidden_size, c.intermediate_size)),
    ("mlp.fc2.bias", ("mlp", "fc2", "bias"), "copy", _dv),
)

_POST_ENTRIES: tuple[_Entry, ...] = (
    ("post_layernorm.weight", ("post_layernorm", "scale"), "copy", _dv),
    ("post_layernorm.bias", ("post_layernorm", "bias"), "copy", _dv),
)


def _key_table(num_layers: int) -> Iterator[_Entry]:
  """Every (torch suffix, flax path, transform, torch shape fn) of a tower with num_layers."""
  yield from _EMBED_ENTRIES
  for i in range(num_layers):
    for suffix, path, kind, shape in _LAYER_ENTRIES:
      yield f"encoder.layers.{i}.{suffix}", (f"layers_{i}", *path), kind, shape
  yield from _POST_ENTRIES


def siglip_torch_keys(num_layers: int, prefix: str = "") -> list[str]:
  """All torch keys of a tower with num_layers encoder layers, in table order."""
  return [prefix + suffix for suffix, *_ in _key_table(num_layers)]


# ---------------------------------------------------------------------------------------------
# torch -> flax


def _layers_present(keys: list[str], prefix: str) -> int:
  pat = re.compile(re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
  found = {int(m.group(1)) for k in keys if (m := pat.match(k))}
  n = 0
  while n in found:
    n += 1
  return n


def siglip_prefix(reader: SafetensorsReader) -> str:
  """The key prefix of the (single) SigLIP vision model in a checkpoint: '' (transformers 5
  SiglipVisionModel), 'vision_model.' (SiglipModel), 'model.vision_tower.vision_tower.
  vision_model.' (FUSION). Raises KeyError when there is none or more than one."""
  anchor = "embeddings.patch_embedding.weight"
  found = sorted(k[:-len(anchor)] for k in reader.keys() if k.endswith(anchor)
                 and (k == anchor or k[:-len(anchor)].endswith(".")))
  if len(found) != 1:
    raise KeyError(f"hf_siglip: {getattr(reader, 'directory', reader)}: expected one "
                   f"'<prefix>{anchor}' tensor, found prefixes {found}; pass the prefix explicitly")
  return found[0]


def siglip_config_from_reader(reader: SafetensorsReader, prefix: str,
                              num_layers: int | None = None) -> VisionConfig:
  """Tower config of the checkpoint under `prefix`, with `num_layers` layers (default: all
  stored layers).

  Uses the directory's config.json when it is a SigLIP config; otherwise (e.g. the tower inside
  a FUSION checkpoint) infers the shapes from the tensors and the head count from the known
  towers (SigLIP so400m/14@384, SigLIP2 giant-opt/16@384).
  """
  keys = reader.keys()
  stored = _layers_present(keys, prefix)
  n = stored if num_layers is None else num_layers
  path = os.path.join(getattr(reader, "directory", ""), "config.json")
  cfg = None
  if os.path.exists(path):
    with open(path) as f:
      raw = json.load(f)
    if "vision_config" in raw or raw.get("model_type") == "siglip_vision_model":
      cfg = siglip_config_from_hf(raw)
  if cfg is None:
    pos_key = prefix + "embeddings.position_embedding.weight"
    patch_key = prefix + "embeddings.patch_embedding.weight"
    fc1_key = prefix + "encoder.layers.0.mlp.fc1.weight"
    missing = [k for k in (pos_key, patch_key, fc1_key) if k not in reader]
    if missing:
      raise KeyError(f"hf_siglip: {getattr(reader, 'directory', reader)}: no SigLIP config.json "
                     f"and tensors {missing} are missing; check the prefix {prefix!r}")
    num_pos, dv = reader.shape(pos_key)
    p = reader.shape(patch_key)[-1]
    mlp = reader.shape(fc1_key)[0]
    # The image size is not recoverable (384 // 14 = 27 = 390 // 14), so match on N.
    matches = [c for c in _KNOWN_TOWERS if (c.hidden_size, c.intermediate_size, c.patch_size,
                                            c.num_patches) == (dv, mlp, p, num_pos)]
    if not matches:
      raise ValueError(
          f"hf_siglip: {getattr(reader, 'directory', reader)} has no SigLIP config.json and its "
          f"tower (Dv {dv}, MLP {mlp}, patch {p}, {num_pos} positions) is not a known preset, so "
          "the head count is unknown; pass config=VisionConfig(...) to siglip_params_from_reader")
    cfg = matches[0]
  return VisionConfig(**{**cfg.to_dict(), "num_layers": n})


def siglip_params_from_reader(reader: SafetensorsReader, prefix: str,
                              num_layers: int | None = None, *,
                              config: VisionConfig | None = None,
                              dtype: Any = np.float32) -> dict[str, Any]:
  """Reads a SigLIP tower into a VisionTower param tree (plain nested numpy dict).

  Args:
    reader: checkpoint reader (tensors are read and converted one at a time).
    prefix: torch key prefix of the vision model, e.g. '' / 'vision_model.' /
      'model.vision_tower.vision_tower.vision_model.'.
    num_layers: read only encoder layers 0..num_layers-1 (FUSION: L-1); default all stored.
    config: tower shape; default from the directory's config.json or the known presets
      (see siglip_config_from_reader). Its num_layers is ignored.
    dtype: numpy dtype of the returned arrays; None keeps the stored dtype.

  Returns:
    The `params` collection of VisionTower(config with num_layers layers), unboxed.

  Raises:
    KeyError listing every missing tensor; ValueError naming key and both shapes on a mismatch.
  """
  keys = reader.keys()
  if num_layers is None:
    num_layers = _layers_present(keys, prefix)
    if num_layers == 0:
      sample = sorted(keys)[:5]
      raise KeyError(f"hf_siglip: no tensors 'encoder.layers.<i>.*' under prefix {prefix!r} in "
                     f"{getattr(reader, 'directory', reader)}; first keys: {sample}. Fix the prefix.")
  if config is None:
    config = siglip_config_from_reader(reader, prefix, num_layers)
  table = list(_key_table(num_layers))
  missing = [prefix + s for s, *_ in table if prefix + s not in reader]
  if missing:
    shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
    raise KeyError(f"hf_siglip: {getattr(reader, 'directory', reader)} lacks {len(missing)} "
                   f"tensors of a {num_layers}-layer SigLIP tower under prefix {prefix!r}: {shown}")
  params: dict[str, Any] = {}
  for suffix, path, kind, shape_fn in table:
    key = prefix + suffix
    want = shape_fn(config)
    got = tuple(reader.shape(key))
    if got != want:
      raise ValueError(f"hf_siglip: {key} has shape {got}, expected {want} for tower "
                       f"(Dv {config.hidden_size}, MLP {config.intermediate_size}, patch "
                       f"{config.patch_size}, image {config.image_size}); wrong config or prefix?")
    t = np.asarray(reader.get(key))
    if dtype is not None:
      t = t.astype(dtype, copy=False)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(_TO_FLAX[kind](t, config))
  return params


# ---------------------------------------------------------------------------------------------
# flax -> torch


def siglip_tensors_to_torch(params: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, np.ndarray]]:
  """Exact inverse of siglip_params_from_reader: yields (torch key, array) one at a time.

  `params` is a VisionTower param tree (plain or boxed, numpy or jax arrays; a dict with a
  single 'params' collection is accepted too). Layers are those present (layers_0..).
  """
  params = meta.unbox(params)
  if "params" in params and "embeddings" not in params:
    params = params["params"]
  num_layers = 0
  while f"layers_{num_layers}" in params:
    num_layers += 1
  extra = sorted(k for k in params if k.startswith("layers_") and
                 not (k[7:].isdigit() and int(k[7:]) < num_layers))
  if extra:
    raise ValueError(f"hf_siglip: layer entries {extra} are not contiguous from layers_0")
  for suffix, path, kind, _ in _key_table(num_layers):
    node: Any = params
    for name in path:
      if name not in node:
        raise KeyError(f"hf_siglip: param {'/'.join(path)} missing from the VisionTower params "
                       f"(needed for torch key {prefix + suffix})")
      node = node[name]
    yield prefix + suffix, np.ascontiguousarray(_TO_TORCH[kind](np.asarray(node)))
