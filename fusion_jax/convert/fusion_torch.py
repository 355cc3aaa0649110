"""The whole FUSION checkpoint: the authors' torch layout <-> the fusion_jax `Fusion` param tree.

A checkpoint written by the authors' code (transformers `save_pretrained` of FusionPhiForCausalLM
/ FusionLlamaForCausalLM, see docs/model.md §14) holds five groups of tensors; each group's
table lives with its module and is used here in both directions:

  torch keys                                              Fusion params     table
  model.embed_tokens / model.layers.* / model.norm,       llm/...           hf_llm.llm_tensor_table
    lm_head.weight
  model.vision_tower.vision_tower.vision_model.*          vision_tower/...  hf_siglip._key_table
    (L-1 encoder layers; the dropped last layer is absent)
  model.mm_projector.{0,2}.{weight,bias}                  mm_projector/linear_{0,2}/{kernel,bias}
  model.aux_projector.{0,2}.{weight,bias}                 aux_projector/linear_{0,2}/{kernel,bias}
  model.vision_sampler_layers.{j}.layers.0.*              interaction_{j}/  fusion_keys

The config side (config.json <-> FusionConfig) is fusion_jax/convert/fusion_torch_config.py.
"""
from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from fusion_jax.convert import hf_llm
# The per-module key tables are shared on purpose (one table per module, used both ways here).
from fusion_jax.convert.fusion_keys import (_INTERACTION_TABLE, interaction_params_from_torch,
                                            interaction_tensors_to_torch, interaction_torch_keys)
from fusion_jax.convert.hf_siglip import (_key_table as _siglip_key_table,
                                          siglip_params_from_reader, siglip_tensors_to_torch)
from fusion_jax.models.fusion import FusionConfig
from fusion_jax.models import param_layout
from fusion_jax.models.vision import SIGLIP2_GIANT_OPT_16_384, VisionConfig

LLM_PREFIX = "model."
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
INTERACTION_PREFIX = "model.vision_sampler_layers."
PROJECTORS = ("mm_projector", "aux_projector")
# Tensors some checkpoints carry that hold no weights (recomputed buffers).
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# small helpers


def _listed(keys: list[str]) -> str:
  shown = ", ".join(keys[:_MAX_LISTED])
  return shown + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def unbox(tree: Any) -> Any:
  """Strips nn.Partitioned boxes by value (nn.meta.unbox would add sharding constraints under a
  mesh context, which host-side conversion must not do); accepts {'params': tree} too."""
  tree = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
  if isinstance(tree, Mapping) and set(tree) == {"params"}:
    tree = tree["params"]
  return tree


def tower_dir_name(vision: VisionConfig) -> str:
  """Name of the exported tower subfolder (config.json's mm_vision_tower).

  The authors' fusion/model/multimodal_encoder/builder.py picks the tower class from this
  STRING: 'siglip2' in it -> SigLip2VisionTower (hard-codes 576 patches), else 'siglip' ->
  SigLipVisionTower (hard-codes 729); anything else raises "Unknown vision tower". So the
  folder name must carry the right word.
  """
  is_siglip2 = (vision.num_patches == SIGLIP2_GIANT_OPT_16_384.num_patches
                and vision.hidden_size == SIGLIP2_GIANT_OPT_16_384.hidden_size)
  return "siglip2_vision_tower" if is_siglip2 else "siglip_vision_tower"


def _projector_table(cfg: FusionConfig) -> list[tuple[str, tuple[str, ...], str, tuple[int, ...]]]:
  """(torch key, flax path, kind, torch shape) of both projectors; kind linear|copy."""
  d, dv = cfg.llm.hidden_size, cfg.vision.hidden_size
  dims = {"mm_projector": (3 * dv, d, d), "aux_projector": (d, dv, dv)}
  out = []
  for name in PROJECTORS:
    n_in, n_mid, n_out = dims[name]
    for idx, (fi, fo) in (("0", (n_in, n_mid)), ("2", (n_mid, n_out))):
      base = f"model.{name}.{idx}."
      out.append((base + "weight", (name, f"linear_{idx}", "kernel"), "linear", (fo, fi)))
      out.append((base + "bias", (name, f"linear_{idx}", "bias"), "copy", (fo,)))
  return out


def _interaction_shapes(j: int, d: int) -> dict[str, tuple[int, ...]]:
  keys = interaction_torch_keys(j, INTERACTION_PREFIX)
  return {k: tuple(u * d for u in units) for k, (_, _, _, units) in zip(keys, _INTERACTION_TABLE)}


def expected_torch_shapes(cfg: FusionConfig) -> dict[str, tuple[int, ...]]:
  """Every torch key of a FUSION checkpoint for `cfg` with its shape, in file order."""
  shapes = {s.key: s.shape for s in hf_llm.llm_tensor_table(cfg.llm, LLM_PREFIX)}
  for suffix, _, _, shape_fn in _siglip_key_table(cfg.vision.num_layers):
    shapes[TOWER_PREFIX + suffix] = tuple(shape_fn(cfg.vision))
  for key, _, _, shape in _projector_table(cfg):
    shapes[key] = shape
  for j in range(len(cfg.interaction_layers)):
    shapes.update(_interaction_shapes(j, cfg.llm.hidden_size))
  return shapes


def _stored_interaction_indices(keys: list[str]) -> set[int]:
  pat = re.compile(re.escape(INTERACTION_PREFIX) + r"(\d+)\.")
  return {int(m.group(1)) for k in keys if (m := pat.match(k))}


def unused_interaction_layers(reader, cfg: FusionConfig) -> list[int]:
  """Stored interaction layers j that never run (schedule entries past the LLM depth: the
  authors build a module per entry of num_of_vision_sampler_layers); import drops them."""
  n_used = len(cfg.interaction_layers)
  return sorted(j for j in _stored_interaction_indices(list(reader.keys()))
                if n_used <= j < cfg.num_interaction)


def stored_tower_layers(keys: list[str]) -> set[int]:
  pat = re.compile(re.escape(TOWER_PREFIX) + r"encoder\.layers\.(\d+)\.")
  return {int(m.group(1)) for k in keys if (m := pat.match(k))}


# ---------------------------------------------------------------------------------------------
# params


def check_fusion_checkpoint(reader, cfg: FusionConfig) -> dict[str, tuple[int, ...]]:
  """Validates key names and shapes against `cfg` without reading tensor data.

  Every expected key must be present with its shape, and every stored key must be expected,
  except interaction layers the authors build for schedule entries past the LLM depth (never
  run, so dropped) and non-weight buffers. Raises one ValueError listing all problems.
  Returns {expected key: shape}.
  """
  expected = expected_torch_shapes(cfg)
  stored = list(reader.keys())
  stored_set = set(stored)
  n_used = len(cfg.interaction_layers)
  unused_interaction = {k for j in _stored_interaction_indices(stored)
                        if n_used <= j < cfg.num_interaction
                        for k in interaction_torch_keys(j, INTERACTION_PREFIX)}
  problems = []
  missing = [k for k in expected if k not in stored_set]
  if missing:
    problems.append(f"missing tensors ({len(missing)}): {_listed(missing)}")
  unexpected = sorted(k for k in stored_set if k not in expected and k not in unused_interaction
                      and not k.endswith(_IGNORED_SUFFIXES))
  if unexpected:
    problems.append(f"unexpected tensors ({len(unexpected)}, not part of a FUSION model with this "
                    f"config): {_listed(unexpected)}")
  bad = [f"{k}: stored {tuple(reader.shape(k))} vs expected {shape}"
         for k, shape in expected.items() if k in stored_set and tuple(reader.shape(k)) != shape]
  if bad:
    problems.append(f"shape mismatches ({len(bad)}): " + "; ".join(bad[:_MAX_LISTED]))
  if problems:
    where = getattr(reader, "directory", "checkpoint")
    raise ValueError(
        f"{where}: not a FUSION checkpoint matching its config ({describe(cfg)}):\n  "
        + "\n  ".join(problems)
        + "\nCheck that config.json (and the tower config) belong to these weights.")
  return expected


def fusion_params_from_reader(reader, cfg: FusionConfig, dtype: Any = np.float32) -> dict[str, Any]:
  """Reads an authors' FUSION checkpoint into the Fusion param tree (plain numpy dicts).

  Strict: raises ValueError listing every missing, unexpected or mis-shaped tensor before any
  tensor is read. Tensors are read, converted and placed one at a time.

  Args:
    reader: SafetensorsReader (keys / shape / get) over the checkpoint directory.
    cfg: the model's FusionConfig (fusion_config_from_torch).
    dtype: numpy dtype of every leaf; None keeps the stored dtypes.
  """
  check_fusion_checkpoint(reader, cfg)
  llm = hf_llm.llm_params_from_reader(reader, cfg.llm, LLM_PREFIX, dtype=dtype, strict=True)
  params: dict[str, Any] = {
      "llm": llm,
      "vision_tower": siglip_params_from_reader(reader, TOWER_PREFIX, cfg.vision.num_layers,
                                                config=cfg.vision, dtype=dtype),
  }
  for key, path, kind, _ in _projector_table(cfg):
    t = reader.get(key)
    if dtype is not None:
      t = t.astype(dtype, copy=False)
    node = params
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(t.T) if kind == "linear" else t

  def get(key: str) -> np.ndarray:
    t = reader.get(key)
    return t if dtype is None else t.astype(dtype, copy=False)

  for j in range(len(cfg.interaction_layers)):
    params[f"interaction_{j}"] = interaction_params_from_torch(get, j, INTERACTION_PREFIX)
  return param_layout.to_config_layout(params, cfg)


def fusion_tensors_to_torch(params: Mapping[str, Any], cfg: FusionConfig, *,
                            dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, numpy array) for every tensor of the authors' checkpoint, one at a time.

  params: the Fusion param tree (boxed or not, numpy or jax arrays, {'params': ...} accepted).
  dtype: cast every tensor (e.g. np.float32, ml_dtypes.bfloat16); None keeps the leaf dtypes.
  """
  params = param_layout.to_unscanned(unbox(params), cfg)  # torch's layout is per layer
  want = {"llm", "vision_tower", *PROJECTORS,
          *(f"interaction_{j}" for j in range(len(cfg.interaction_layers)))}
  extra, missing = sorted(set(params) - want), sorted(want - set(params))
  if extra or missing:
    raise ValueError(f"fusion_tensors_to_torch: params do not match the config ({describe(cfg)}):"
                     f" missing subtrees {missing}, unexpected subtrees {extra}")
  stored_layers = sum(1 for k in params["vision_tower"] if k.startswith("layers_"))
  if stored_layers != cfg.vision.num_layers:
    raise ValueError(f"fusion_tensors_to_torch: vision_tower has {stored_layers} layers, config "
                     f"says {cfg.vision.num_layers}")

  def cast(a) -> np.ndarray:
    a = np.asarray(jax.device_get(a))
    return np.ascontiguousarray(a if dtype is None else a.astype(dtype))

  for key, arr in hf_llm.llm_tensors_to_torch(params["llm"], cfg.llm, LLM_PREFIX):
    yield key, cast(arr)
  for key, arr in siglip_tensors_to_torch(params["vision_tower"], TOWER_PREFIX):
    yield key, cast(arr)
  for key, path, kind, shape in _projector_table(cfg):
    node: Any = params
    for name in path:
      node = node[name]
    t = cast(node)
    t = np.ascontiguousarray(t.T) if kind == "linear" else t
    if t.shape != shape:
      raise ValueError(f"fusion_tensors_to_torch: params/{'/'.join(path)} gives {key} shape "
                       f"{t.shape}, expected {shape}")
    yield key, t
  for j in range(len(cfg.interaction_layers)):
    for key, arr in interaction_tensors_to_torch(params[f"interaction_{j}"], j, INTERACTION_PREFIX):
      yield key, cast(arr)


def abstract_params(cfg: FusionConfig) -> Any:
  """ShapeDtypeStructs of Fusion(cfg)'s params (unboxed), without allocating anything."""
  from fusion_jax.models import fusion  # model import kept local: converters stay light
  batch = fusion.init_batch(cfg)
  return unbox(jax.eval_shape(lambda: fusion.init(jax.random.key(0), cfg, batch)))


def check_param_shapes(params: Any, cfg: FusionConfig) -> None:
  """Raises ValueError naming every leaf whose path or shape differs from Fusion(cfg)'s init."""
  want = {jax.tree_util.keystr(p): tuple(x.shape)
          for p, x in jax.tree_util.tree_leaves_with_path(abstract_params(cfg))}
  got = {jax.tree_util.keystr(p): tuple(np.shape(x))
         for p, x in jax.tree_util.tree_leaves_with_path(unbox(params))}
  problems = [f"missing {k}" for k in want if k not in got]
  problems += [f"unexpected {k}" for k in got if k not in want]
  problems += [f"{k}: {got[k]} vs model {want[k]}" for k in want if k in got and got[k] != want[k]]
  if problems:
    raise ValueError(f"params do not match Fusion({describe(cfg)}): " + "; ".join(problems[:20]))


def describe(cfg: FusionConfig) -> str:
  """One line: LLM, tower, interaction schedule, q / window, template."""
  llm, v = cfg.llm, cfg.vision
  return (f"{llm.arch} LLM {llm.num_layers} layers D {llm.hidden_size} heads "
          f"{llm.num_heads}/{llm.num_kv_heads} vocab {llm.vocab_size}; SigLIP tower "
          f"{v.num_layers}(+1 dropped) layers Dv {v.hidden_size} N {v.num_patches} "
          f"({v.image_size}px/{v.patch_size}); interaction after LLM layers "
          f"{list(cfg.interaction_layers)}; q {list(cfg.query_len)} window {cfg.window_size}; "
          f"template {cfg.template}")


def param_count(params: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(unbox(params))))
