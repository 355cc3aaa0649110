"""The whole FUSION checkpoint: the authors' torch layout <-> the fusion_jax `Fusion` param tree.

A checkpoint written by the authors' code (transformers `save_pretrained` of FusionPhiForCausalLM
/ FusionLlamaForCausalLM, see TORCH_LAYOUT.md) holds five groups of tensors; each group's
table lives with its module and is used here in both directions:

  torch keys                                              Fusion params     table
  model.embed_tokens / model.layers.* / model.norm,       llm/...           hf_llm.llm_tensor_table
    lm_head.weight
  model.vision_tower.vision_tower.vision_model.*          vision_tower/...  hf_siglip._key_table
    (L-1 encoder layers; the dropped last layer is absent)
  model.mm_projector.{0,2}.{weight,bias}                  mm_projector/linear_{0,2}/{kernel,bias}
  model.aux_projector.{0,2}.{weight,bias}                 aux_projector/linear_{0,2}/{kernel,bias}
  model.vision_sampler_layers.{j}.layers.0.*              interaction_{j}/  fusion_keys

The config side (`fusion_config_from_torch` / `fusion_config_to_torch`) follows the fields the
authors' code sets and reads: fusion/model/fusion_arch.py (initialize_vision_modules),
fusion/train/train.py (ModelArguments, the model.config.* assignments),
fusion/model/language_model/fusion_{phi,llama}.py (model_type) in starriver030515/FUSION-Code.
Fields of FusionConfig that the authors' config cannot express (compute dtypes, ablation
switches, interaction heads of a non-paper model, ...) travel in an extra `fusion_jax_config`
entry of config.json, which transformers keeps as a plain attribute and the authors ignore.
"""
from __future__ import annotations

import dataclasses
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
from fusion_jax.convert.hf_siglip import (_key_table as _siglip_key_table, siglip_config_from_hf,
                                          siglip_config_from_reader, siglip_params_from_reader,
                                          siglip_tensors_to_torch)
from fusion_jax.models.fusion import FusionConfig
from fusion_jax.models.llm import LLMConfig, stack_layers
from fusion_jax.models.rope import Llama3Scaling, LongRopeScaling
from fusion_jax.models.vision import SIGLIP2_GIANT_OPT_16_384, VisionConfig

LLM_PREFIX = "model."
TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."
INTERACTION_PREFIX = "model.vision_sampler_layers."
PROJECTORS = ("mm_projector", "aux_projector")
# Extra config.json entry carrying the FusionConfig fields the authors' config cannot express.
FUSION_JAX_KEY = "fusion_jax_config"

# model_type -> (LLM arch, conversation template, architectures entry)
MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "fusion_phi": ("phi3", "phi_3", "FusionPhiForCausalLM"),
    "fusion_llama": ("llama", "llama_3", "FusionLlamaForCausalLM"),
}
_MODEL_TYPE_OF_ARCH = {arch: mt for mt, (arch, _, _) in MODEL_TYPES.items()}
# FUSION's padding ids per template (train.py: Phi `<unk>` 0, Llama-3 reserved_special_token_0).
_TEMPLATE_PAD = {"phi_3": 0, "llama_3": 128002}
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


def _stored_tower_layers(keys: list[str]) -> set[int]:
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
  if cfg.llm.scan_layers:
    llm = stack_layers(llm, cfg.llm.num_layers)
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
  return params


def fusion_tensors_to_torch(params: Mapping[str, Any], cfg: FusionConfig, *,
                            dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (torch key, numpy array) for every tensor of the authors' checkpoint, one at a time.

  params: the Fusion param tree (boxed or not, numpy or jax arrays, {'params': ...} accepted).
  dtype: cast every tensor (e.g. np.float32, ml_dtypes.bfloat16); None keeps the leaf dtypes.
  """
  params = unbox(params)
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
  batch = fusion.example_batch(cfg, batch_size=1, seq_len=8, max_questions=1,
                               q=cfg.query_len[0], seed=None)
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


# ---------------------------------------------------------------------------------------------
# config


def _rope_to_legacy(llm: LLMConfig) -> tuple[dict[str, Any] | None, dict[str, Any]]:
  """(rope_scaling, extra top-level fields) as transformers 4.48 writes them.

  Llama-3.1: rope_scaling {rope_type llama3, factor, low/high_freq_factor, original_max...}.
  Phi-3: rope_scaling {type longrope, short_factor, long_factor} (4.48's Phi3Config validation
  wants exactly these three keys) and a top-level original_max_position_embeddings.
  """
  s = llm.rope_scaling
  if s is None:
    return None, {}
  if isinstance(s, Llama3Scaling):
    return {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
            "high_freq_factor": s.high_freq_factor,
            "original_max_position_embeddings": s.original_max_position_embeddings}, {}
  if isinstance(s, LongRopeScaling):
    rope: dict[str, Any] = {"type": "longrope", "short_factor": list(s.short_factor),
                            "long_factor": list(s.long_factor)}
    # Not expressible in 4.48's Phi3Config; transformers 5 reads them (Phi-3.5 leaves both unset).
    for name in ("factor", "attention_factor"):
      if getattr(s, name) is not None:
        rope[name] = getattr(s, name)
    return rope, {"original_max_position_embeddings": s.original_max_position_embeddings}
  raise ValueError(f"fusion_config_to_torch: unsupported rope scaling {s!r}")


def tower_config_to_hf(vision: VisionConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """The tower folder's config.json: a SiglipVisionConfig with L = stored layers + 1.

  The authors' SigLipVisionTower.load_model (fusion/model/multimodal_encoder/siglip_encoder.py)
  loads L layers and deletes the last, so the folder must describe the full tower.
  """
  return {
      "model_type": "siglip_vision_model", "architectures": ["SiglipVisionModel"],
      "hidden_size": vision.hidden_size, "intermediate_size": vision.intermediate_size,
      "num_hidden_layers": vision.num_layers + 1, "num_attention_heads": vision.num_heads,
      "num_channels": 3, "image_size": vision.image_size, "patch_size": vision.patch_size,
      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.layer_norm_eps,
      "attention_dropout": 0.0, "torch_dtype": torch_dtype,
  }


# Fields of the source LLM config.json worth keeping on export (ids the tokenizer defines).
_PASSTHROUGH = ("bos_token_id", "eos_token_id", "attention_dropout", "resid_pdrop", "embd_pdrop")


def fusion_config_to_torch(cfg: FusionConfig, *, torch_dtype: str = "float32",
                           model_max_length: int = 4096,
                           source_config: Mapping[str, Any] | None = None,
                           ) -> tuple[dict[str, Any], dict[str, Any]]:
  """(config.json dict, tower config.json dict) the authors' loader reads.

  The base config is written as transformers 4.48 wrote it (rope_theta + rope_scaling), which
  transformers 5 also reads. FUSION fields follow train.py / fusion_arch.py.

  Args:
    torch_dtype: dtype name recorded in both configs (that of the exported tensors).
    model_max_length: tokenizer_model_max_length (train.py: --model_max_length, 2048 in stage 1,
      4096 after).
    source_config: the original LLM / FUSION config.json, if known; its token ids
      (bos/eos) and dropout fields are kept.
  """
  llm, vision = cfg.llm, cfg.vision
  model_type = _MODEL_TYPE_OF_ARCH[llm.arch]
  rope_scaling, rope_extra = _rope_to_legacy(llm)
  base: dict[str, Any] = {k: source_config[k] for k in _PASSTHROUGH
                          if source_config and k in source_config}
  base.update({
      "model_type": model_type, "architectures": [MODEL_TYPES[model_type][2]],
      "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
      "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
      "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
      "hidden_act": "silu", "rms_norm_eps": llm.rms_norm_eps, "rope_theta": llm.rope_theta,
      "rope_scaling": rope_scaling, "max_position_embeddings": llm.max_position_embeddings,
      "tie_word_embeddings": llm.tie_word_embeddings, "pad_token_id": llm.pad_token_id,
      "initializer_range": llm.initializer_range, "use_cache": True, "torch_dtype": torch_dtype,
      **rope_extra,
  })
  if llm.arch == "llama":
    base.update(head_dim=llm.head_dim, attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    if llm.head_dim * llm.num_heads != llm.hidden_size:
      raise ValueError(f"fusion_config_to_torch: Phi-3 needs head_dim * heads == hidden_size "
                       f"({llm.head_dim} * {llm.num_heads} != {llm.hidden_size})")
    base.update(sliding_window=None)
  num_interaction = cfg.num_interaction if cfg.interaction else 0
  base.update({
      # fusion_arch.py initialize_vision_modules / train.py model.config.* assignments.
      "mm_vision_tower": tower_dir_name(vision), "mm_hidden_size": vision.hidden_size,
      "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
      "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat", "use_mm_proj": True,
      "query_len": ",".join(str(q) for q in cfg.query_len), "window_size": cfg.window_size,
      "num_of_vision_sampler_layers": num_interaction,
      "start_of_vision_sampler_layers": cfg.interaction_start,
      "stride_of_vision_sampler_layers": cfg.interaction_stride,
      "image_aspect_ratio": "static_hd", "mm_use_im_start_end": True,
      "mm_use_im_patch_token": False, "unfreeze_mm_vision_tower": True,
      "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False,
      "mm_projector_lr": None, "mm_vision_tower_lr": None,
      "tokenizer_model_max_length": int(model_max_length), "tokenizer_padding_side": "right",
      FUSION_JAX_KEY: cfg.to_dict(),
  })
  return base, tower_config_to_hf(vision, torch_dtype)


def _vision_from_tower_config(tower_config: Mapping[str, Any], reader) -> VisionConfig:
  full = siglip_config_from_hf(tower_config)
  stored = _stored_tower_layers(reader.keys())
  n = len(stored)
  if stored != set(range(n)):
    raise ValueError(f"{getattr(reader, 'directory', 'checkpoint')}: tower layers "
                     f"{sorted(stored)} are not contiguous from 0")
  if n != full.num_layers - 1:
    raise ValueError(
        f"{getattr(reader, 'directory', 'checkpoint')}: the checkpoint stores {n} tower encoder "
        f"layers but the tower config has num_hidden_layers={full.num_layers}; FUSION stores "
        f"L-1 = {full.num_layers - 1} (the last layer is dropped). Pass the config of the tower "
        "this model was trained from (--tower-config).")
  return dataclasses.replace(full, num_layers=n)


def fusion_config_from_torch(config_json: Mapping[str, Any], tower_config: Mapping[str, Any] | None,
                             reader) -> FusionConfig:
  """FusionConfig of an authors' checkpoint.

  Args:
    config_json: the checkpoint's config.json (model_type fusion_phi or fusion_llama).
    tower_config: the tower's own config.json (SiglipVisionConfig dict, or SiglipConfig with
      vision_config), whose num_hidden_layers is L (stored layers + 1); None infers the tower
      from the stored shapes (known towers only, since the head count is not stored).
    reader: the checkpoint reader (vocabulary size from the stored embedding, tower layers).

  Raises ValueError on an unsupported model_type, a tower layer count other than L-1, or a
  vocabulary that disagrees with the stored embedding in a way that cannot be resolved.
  """
  model_type = config_json.get("model_type")
  if model_type not in MODEL_TYPES:
    archs = config_json.get("architectures")
    raise ValueError(
        f"config.json: model_type {model_type!r} (architectures {archs}) is not a FUSION model "
        "this converter supports; supported: "
        + ", ".join(f"{mt} ({a})" for mt, (_, _, a) in MODEL_TYPES.items()))
  _, template, _ = MODEL_TYPES[model_type]
  where = getattr(reader, "directory", "checkpoint")
  embed_key = LLM_PREFIX + "embed_tokens.weight"
  if embed_key not in reader:
    raise ValueError(f"{where}: no {embed_key}; not a FUSION checkpoint (keys under "
                     f"{LLM_PREFIX!r} expected)")
  vocab = int(reader.shape(embed_key)[0])
  llm = LLMConfig.from_hf(config_json, vocab_size=vocab)
  pad = config_json.get("pad_token_id")
  fusion_pad = _TEMPLATE_PAD[template]
  # FUSION's pad is the template's (train.py), not the base config's (Phi-3.5 says 32000).
  llm = llm.replace(pad_token_id=fusion_pad if fusion_pad < vocab else
                    (int(pad) if isinstance(pad, int) and pad < vocab else 0))

  if tower_config is not None:
    vision = _vision_from_tower_config(tower_config, reader)
  else:
    vision = siglip_config_from_reader(reader, TOWER_PREFIX)

  ql = config_json.get("query_len", "4,16,36,64,144")
  query_len = tuple(int(x) for x in (ql.split(",") if isinstance(ql, str) else ql))
  fields: dict[str, Any] = dict(
      llm=llm, vision=vision, query_len=query_len,
      window_size=int(config_json.get("window_size", 3)),
      num_interaction=int(config_json.get("num_of_vision_sampler_layers", 10)),
      interaction_start=int(config_json.get("start_of_vision_sampler_layers", 0)),
      interaction_stride=int(config_json.get("stride_of_vision_sampler_layers", 3)),
      template=template)
  block = config_json.get(FUSION_JAX_KEY)
  if block:
    # Written by fusion_config_to_torch: the fields torch cannot express. Architecture comes
    # from the torch side (authoritative for the weights); runtime settings from the block.
    saved = FusionConfig.from_dict(block)
    runtime_llm = ("dtype", "param_dtype", "remat_policy", "scan_layers", "pad_token_id")
    runtime_vision = ("dtype", "param_dtype", "remat_policy")
    fields["llm"] = llm.replace(**{k: getattr(saved.llm, k) for k in runtime_llm})
    fields["vision"] = dataclasses.replace(
        vision, **{k: getattr(saved.vision, k) for k in runtime_vision})
    for f in dataclasses.fields(FusionConfig):
      if f.name not in fields:
        fields[f.name] = getattr(saved, f.name)
    if not saved.interaction:  # exported with 0 interaction layers; keep the schedule
      fields["num_interaction"] = saved.num_interaction
  return FusionConfig(**fields)


def describe(cfg: FusionConfig) -> str:
  """One line: LLM, tower, interaction schedule, q / window, template."""
  llm, v = cfg.llm, cfg.vision
  return (f"{llm.arch} LLM {llm.num_layers} layers D {llm.hidden_size} heads "
          f"{llm.num_heads}/{llm.num_kv_heads} vocab {llm.vocab_size}; SigLIP tower "
          f"{v.num_layers}(+1 dropped) layers Dv {v.hidden_size} N {v.num_patches} "
          f"({v.image_size}px/{v.patch_size}); interaction after LLM layers "
          f"{list(cfg.interaction_layers)}; q {list(cfg.query_len)} window {cfg.window_size}; "
          f"template {cfg.template}")


def matching_preset(cfg: FusionConfig) -> str | None:
  """Name of the preset with the same architecture (dtypes and runtime settings ignored)."""
  from fusion_jax.models.presets import PRESETS

  def arch(c: FusionConfig) -> tuple:
    llm = {k: v for k, v in c.llm.to_dict().items()
           if k not in ("dtype", "param_dtype", "remat_policy", "scan_layers", "pad_token_id",
                        "initializer_range")}
    vis = {k: v for k, v in c.vision.to_dict().items()
           if k not in ("dtype", "param_dtype", "remat_policy")}
    return (repr(sorted(llm.items())), repr(sorted(vis.items())), c.query_len, c.window_size,
            c.interaction_layers, c.template, c.fusion_l_grid)

  mine = arch(cfg)
  for name, preset in PRESETS.items():
    if arch(preset) == mine:
      return name
  return None


def param_count(params: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(unbox(params))))
