"""Load a local transformers `save_pretrained` directory into fusion_jax params.

  kind, config, params = load_hf_dir("/ckpt/Llama-3.1-8B-Instruct")

Supported (dispatch on config.json `architectures`, then `model_type`):
  LlamaForCausalLM / llama            -> ('llm', LLMConfig, Decoder params)
  Phi3ForCausalLM / phi3              -> ('llm', LLMConfig, Decoder params)
  SiglipVisionModel / siglip_vision_model -> ('siglip', VisionConfig, vision params)
  SiglipModel / siglip (vision tower only; text tower ignored)
                                      -> ('siglip', VisionConfig, vision params)
Weights are read from model.safetensors or shards + model.safetensors.index.json, one tensor
at a time. Params are plain nested dicts of numpy arrays in the unscanned layout.
"""
from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fusion_jax.convert.safetensors_io import SafetensorsReader

SUPPORTED = {
    "LlamaForCausalLM": ("llm", "llama"),
    "Phi3ForCausalLM": ("llm", "phi3"),
    "SiglipVisionModel": ("siglip", "siglip_vision_model"),
    "SiglipModel": ("siglip", "siglip"),
}
_BY_MODEL_TYPE = {mt: arch for arch, (_, mt) in SUPPORTED.items()}


def read_config(directory: str) -> dict[str, Any]:
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory}: no config.json; point at a transformers "
                            "save_pretrained directory")
  with open(path) as f:
    return json.load(f)


def hf_architecture(cfg: dict[str, Any], where: str = "config.json") -> str:
  """The supported architecture name of a config.json dict, else ValueError naming the options."""
  for a in cfg.get("architectures") or []:
    if a in SUPPORTED:
      return a
  mt = cfg.get("model_type")
  if mt in _BY_MODEL_TYPE:
    return _BY_MODEL_TYPE[mt]
  options = ", ".join(f"{a} (model_type {mt!r})" for a, (_, mt) in SUPPORTED.items())
  raise ValueError(f"{where}: architectures={cfg.get('architectures')}, model_type={mt!r} is not "
                   f"supported; supported: {options}")


def _vision_prefix(reader: SafetensorsReader, arch: str) -> str:
  """transformers 4.x saves SiglipVisionModel under 'vision_model.'; 5.x saves it bare."""
  keys = reader.keys()
  if any(k.startswith("vision_model.") for k in keys):
    return "vision_model."
  if arch == "SiglipVisionModel" and any(k.startswith("embeddings.") for k in keys):
    return ""
  raise ValueError(f"{reader.directory}: no SigLIP vision tensors (expected keys under "
                   "'vision_model.' or, for SiglipVisionModel saved by transformers 5, 'embeddings.')")


def load_hf_dir(directory: str, *, weights_dtype: Any = None, strict: bool = True,
                overrides: Mapping[str, Any] | None = None) -> tuple[str, Any, dict[str, Any]]:
  """(kind, config, params) for a local transformers directory.

  weights_dtype: cast params while reading (e.g. np.float32); None keeps the stored dtype.
  strict: unexpected tensors in the model's namespace are an error (LLMs).
  overrides: config fields to replace (dtype, param_dtype, remat_policy, scan_layers, ...).
  Raises ValueError naming the supported architectures, or listing missing / unexpected
  tensors and shape mismatches.
  """
  hf_cfg = read_config(directory)
  arch = hf_architecture(hf_cfg, os.path.join(directory, "config.json"))
  kind = SUPPORTED[arch][0]
  reader = SafetensorsReader(directory)
  if kind == "llm":
    from fusion_jax.convert.hf_llm import llm_params_from_reader
    from fusion_jax.models.llm_config import LLMConfig
    cfg = LLMConfig.from_hf(hf_cfg, **dict(overrides or {}))
    params = llm_params_from_reader(reader, cfg, "model.", dtype=weights_dtype, strict=strict)
    return kind, cfg, params
  # SigLIP: converter functions live with the vision model (imported lazily).
  from fusion_jax.convert.hf_siglip import siglip_config_from_hf, siglip_params_from_reader
  vision_cfg = hf_cfg["vision_config"] if arch == "SiglipModel" else hf_cfg
  cfg = siglip_config_from_hf(vision_cfg)
  if overrides:
    cfg = dataclasses.replace(cfg, **dict(overrides))
  params = siglip_params_from_reader(reader, _vision_prefix(reader, arch), None)
  if weights_dtype is not None:
    params = _cast_tree(params, np.dtype(weights_dtype))
  return kind, cfg, params


def _cast_tree(tree: dict[str, Any], dtype) -> dict[str, Any]:
  """Casts leaves in place, one at a time (never a second full copy)."""
  for k, v in tree.items():
    tree[k] = _cast_tree(v, dtype) if isinstance(v, dict) else v.astype(dtype, copy=False)
  return tree
