"""FUSION's config.json (and its tower's) in the authors' layout <-> `FusionConfig`.

The conversion follows the fields the authors' code sets and reads:
fusion/model/fusion_arch.py (initialize_vision_modules), fusion/train/train.py (ModelArguments,
the model.config.* assignments), fusion/model/language_model/fusion_{phi,llama}.py
(model_type) in starriver030515/FUSION-Code.
Fields of FusionConfig that the authors' config cannot express (compute dtypes, ablation
switches, interaction heads of a non-paper model, ...) travel in an extra `fusion_jax_config`
entry of config.json, which transformers keeps as a plain attribute and the authors ignore.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fusion_jax.convert.fusion_torch import (LLM_PREFIX, TOWER_PREFIX, stored_tower_layers,
                                             tower_dir_name)
from fusion_jax.convert.hf_siglip import siglip_config_from_hf, siglip_config_from_reader
from fusion_jax.models import query_len as query_len_lib
from fusion_jax.models.fusion import FusionConfig
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.models.rope import Llama3Scaling, LongRopeScaling
from fusion_jax.models.vision import VisionConfig

# Extra config.json entry carrying the FusionConfig fields the authors' config cannot express.
FUSION_JAX_KEY = "fusion_jax_config"

# model_type -> (LLM arch, conversation template, architectures entry)
MODEL_TYPES: dict[str, tuple[str, str, str]] = {
    "fusion_phi": ("phi3", "phi_3", "FusionPhiForCausalLM"),
    "fusion_llama": ("llama", "llama_3", "FusionLlamaForCausalLM"),
}
_MODEL_TYPE_OF_ARCH = {arch: mt for mt, (arch, _, _) in MODEL_TYPES.items()}


def model_type_of(cfg: FusionConfig) -> str:
  """config.json's model_type for `cfg`: 'fusion_phi' (Phi-3 LLM) or 'fusion_llama'."""
  return _MODEL_TYPE_OF_ARCH[cfg.llm.arch]


# FUSION's padding ids per template (train.py: Phi `<unk>` 0, Llama-3 reserved_special_token_0).
_TEMPLATE_PAD = {"phi_3": 0, "llama_3": 128002}


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
  model_type = model_type_of(cfg)
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
  # The authors build one vision_sampler_layers module per entry and run entry j after decoder
  # layer start + j * stride: entries past the depth would be modules without tensors.
  num_interaction = len(cfg.interaction_layers)
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
  stored = stored_tower_layers(reader.keys())
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
    try:
      vision = siglip_config_from_reader(reader, TOWER_PREFIX)
    except ValueError:  # not a known tower: its head count is not stored anywhere
      raise ValueError(
          f"{where}: the vision tower's config is unknown (mm_vision_tower "
          f"{config_json.get('mm_vision_tower')!r} is not a local directory) and its stored "
          "shapes match no known tower (SigLIP so400m/14@384, SigLIP2 giant-opt/16@384), so its "
          "head count cannot be inferred; give the tower's config.json with "
          "`python -m fusion_jax.convert.import_torch ... --tower-config DIR`") from None

  query_len = query_len_lib.parse(config_json.get("query_len", query_len_lib.CANDIDATES))
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
    # The export writes the interaction layers that exist (schedule entries past the LLM depth
    # have no tensors) or 0 when interaction is off; the block keeps the schedule as configured.
    same_schedule = (saved.interaction_start, saved.interaction_stride) == (
        fields["interaction_start"], fields["interaction_stride"])
    if not saved.interaction or (same_schedule and len(saved.interaction_layers)
                                 == fields["num_interaction"]):
      fields["num_interaction"] = saved.num_interaction
  return FusionConfig(**fields)


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
