"""Decoder hyper-parameters of FUSION's language models (Llama-3.1, Phi-3.5): `LLMConfig`, the
transformers config.json mapping (`hf_arch`, `LLMConfig.from_hf` / `to_hf`) and the presets."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from fusion_jax import config_util
from fusion_jax.parallel import remat as remat_lib
from fusion_jax.models.rope import (Llama3Scaling, LongRopeScaling, RopeScaling, scaling_from_dict,
                                    scaling_to_dict)

ARCHS = ("llama", "phi3")
ATTENTION_IMPLS = ("auto", "xla", "splash", "cudnn")  # fusion_jax.models.attention_kernels


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Decoder hyper-parameters (Llama-3.1 or Phi-3 family). Frozen and hashable."""
  arch: str = "llama"
  vocab_size: int = 128256
  hidden_size: int = 4096
  intermediate_size: int = 14336
  num_layers: int = 32
  num_heads: int = 32
  num_kv_heads: int = 8
  head_dim: int = 128
  rms_norm_eps: float = 1e-5
  rope_theta: float = 500000.0
  rope_scaling: RopeScaling | None = None
  max_position_embeddings: int = 131072
  tie_word_embeddings: bool = False
  pad_token_id: int = 0
  initializer_range: float = 0.02
  dtype: str = "bfloat16"          # compute dtype
  param_dtype: str = "float32"
  remat_policy: str = "none"       # see fusion_jax.parallel.remat.POLICY_NAMES
  scan_layers: bool = False
  # Decoder self attention without a KV cache: auto | xla | splash | cudnn
  # (fusion_jax.models.attention_kernels; cached decode always runs the XLA path).
  attention_impl: str = "auto"

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"LLMConfig.arch={self.arch!r}; supported: {ARCHS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLMConfig: num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LLMConfig: head_dim {self.head_dim} must be even for RoPE")
    remat_lib.policy_from_name(self.remat_policy)  # clear error on a bad name
    if self.attention_impl not in ATTENTION_IMPLS:
      raise ValueError(f"LLMConfig.attention_impl={self.attention_impl!r}; choose one of "
                       f"{ATTENTION_IMPLS}")
    if isinstance(self.rope_scaling, Mapping):
      object.__setattr__(self, "rope_scaling", scaling_from_dict(dict(self.rope_scaling)))
    for name in ("dtype", "param_dtype"):
      jnp.dtype(getattr(self, name))  # raises on an unknown dtype name

  def replace(self, **changes) -> LLMConfig:
    return dataclasses.replace(self, **changes)

  # -- plain dict round trip (experiment configs, checkpoints) --
  def to_dict(self) -> dict[str, Any]:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    d["rope_scaling"] = scaling_to_dict(self.rope_scaling)
    return d

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> LLMConfig:
    return config_util.from_dict(cls, d, "LLMConfig.from_dict", convert={
        "rope_scaling": lambda v: scaling_from_dict(v) if isinstance(v, Mapping) else v})

  # -- transformers config.json (4.x `rope_scaling` + `rope_theta`, 5.x `rope_parameters`) --
  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> LLMConfig:
    """LLMConfig from a transformers LlamaForCausalLM / Phi3ForCausalLM config.json dict.

    Also accepts the FUSION authors' model types 'fusion_llama' / 'fusion_phi' (Llama / Phi-3
    base configs). `overrides` (dtype, remat_policy, scan_layers, ...) are applied last.
    """
    arch = hf_arch(hf)
    for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
      if key in hf and hf[key] != ok:
        raise ValueError(f"config.json: {key}={hf[key]!r} is not supported (only {ok!r})")
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = hf.get("head_dim") or hidden // heads
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    prf = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if prf not in (None, 1.0):
      raise ValueError(f"config.json: partial_rotary_factor={prf} is not supported (only 1.0)")
    max_pos = int(hf.get("max_position_embeddings", 4096))
    window = hf.get("sliding_window")
    if window is not None and int(window) < max_pos:
      raise ValueError(f"config.json: sliding_window={window} < max_position_embeddings={max_pos}; "
                       "sliding-window attention is not supported")
    kind = rope.get("rope_type", rope.get("type", "default"))
    scaling: RopeScaling | None
    if kind in ("default", None):
      scaling = None
    elif kind == "llama3":
      scaling = Llama3Scaling(
          factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
          high_freq_factor=float(rope["high_freq_factor"]),
          original_max_position_embeddings=int(
              hf.get("original_max_position_embeddings")
              or rope.get("original_max_position_embeddings", max_pos)))
    elif kind in ("longrope", "su"):
      # transformers gives a top-level original_max_position_embeddings priority (Phi-3).
      scaling = LongRopeScaling(
          short_factor=tuple(rope["short_factor"]), long_factor=tuple(rope["long_factor"]),
          original_max_position_embeddings=int(
              hf.get("original_max_position_embeddings")
              or rope.get("original_max_position_embeddings", max_pos)),
          factor=rope.get("factor"), attention_factor=rope.get("attention_factor"))
    else:
      raise ValueError(f"config.json: rope type {kind!r} is not supported; supported: default, "
                       "llama3, longrope (su)")
    pad = hf.get("pad_token_id")
    cfg = cls(
        arch=arch, vocab_size=int(hf["vocab_size"]), hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]), num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads, num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(head_dim), rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=theta, rope_scaling=scaling, max_position_embeddings=max_pos,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        pad_token_id=int(pad) if isinstance(pad, int) else 0,
        initializer_range=float(hf.get("initializer_range", 0.02)))
    return cfg.replace(**overrides) if overrides else cfg

  def to_hf(self) -> dict[str, Any]:
    """transformers 5.x config.json dict (LlamaForCausalLM or Phi3ForCausalLM)."""
    rope: dict[str, Any] = {"rope_theta": self.rope_theta, "rope_type": "default"}
    if self.rope_scaling is not None:
      rope.update(scaling_to_dict(self.rope_scaling))
      rope = {k: v for k, v in rope.items() if v is not None}
    d: dict[str, Any] = {
        "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
        "rms_norm_eps": self.rms_norm_eps, "max_position_embeddings": self.max_position_embeddings,
        "tie_word_embeddings": self.tie_word_embeddings, "pad_token_id": self.pad_token_id,
        "hidden_act": "silu", "initializer_range": self.initializer_range,
        "rope_parameters": rope,
    }
    if self.arch == "llama":
      d.update(model_type="llama", architectures=["LlamaForCausalLM"], head_dim=self.head_dim,
               attention_bias=False, mlp_bias=False)
    else:
      if self.head_dim * self.num_heads != self.hidden_size:
        raise ValueError("Phi-3 config needs head_dim * num_heads == hidden_size")
      d.update(model_type="phi3", architectures=["Phi3ForCausalLM"], sliding_window=None)
      if isinstance(self.rope_scaling, LongRopeScaling):
        d["original_max_position_embeddings"] = self.rope_scaling.original_max_position_embeddings
    return d


def hf_arch(hf: Mapping[str, Any]) -> str:
  """'llama' or 'phi3' from a config.json dict; ValueError naming what is supported."""
  model_type = hf.get("model_type")
  archs = list(hf.get("architectures") or [])
  if model_type in ("phi3", "fusion_phi") or any(a.startswith(("Phi3", "FusionPhi")) for a in archs):
    return "phi3"
  if model_type in ("llama", "fusion_llama") or any(a.startswith(("Llama", "FusionLlama")) for a in archs):
    return "llama"
  raise ValueError(f"config.json: model_type={model_type!r}, architectures={archs} is not a "
                   "supported LLM; supported: llama (LlamaForCausalLM), phi3 (Phi3ForCausalLM), "
                   "fusion_llama, fusion_phi")


# Phi-3.5-mini-instruct LongRoPE factors (its config.json, rope_scaling.short_factor/long_factor).
_PHI35_SHORT = (
    1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842,
    1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0499999523162842,
    1.0699999332427979, 1.0999999046325684, 1.1099998950958252, 1.1599998474121094,
    1.1599998474121094, 1.1699998378753662, 1.2899998426437378, 1.339999794960022,
    1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
    1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745,
    2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
    2.0199997425079346, 2.0199997425079346, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
    2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
    2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533,
    2.729999542236328, 2.749999523162842, 2.8399994373321533)
_PHI35_LONG = (
    1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601,
    1.5899999141693115, 1.600000023841858, 1.6200000047683716, 2.620000123977661,
    3.2300000190734863, 3.2300000190734863, 4.789999961853027, 7.400000095367432,
    7.700000286102295, 9.09000015258789, 12.199999809265137, 17.670000076293945,
    24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
    32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992,
    50.340003967285156, 50.45000457763672, 57.55000305175781, 57.93000411987305,
    58.21000289916992, 60.1400032043457, 62.61000442504883, 62.62000274658203,
    62.71000289916992, 63.1400032043457, 63.1400032043457, 63.77000427246094,
    63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
    64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938,
    64.4800033569336, 64.51000213623047, 64.52999877929688, 64.83999633789062)

# pad_token_id is FUSION's padding id (the data pipeline's), not the base model's config value:
# Llama-3 `<|reserved_special_token_0|>` (128002), Phi `<unk>` (0).
LLAMA_3_1_8B = LLMConfig(
    arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
    num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=Llama3Scaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192),
    max_position_embeddings=131072, tie_word_embeddings=False, pad_token_id=128002)

PHI_3_5_MINI = LLMConfig(
    arch="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
    num_heads=32, num_kv_heads=32, head_dim=96, rms_norm_eps=1e-5, rope_theta=10000.0,
    rope_scaling=LongRopeScaling(short_factor=_PHI35_SHORT, long_factor=_PHI35_LONG,
                                 original_max_position_embeddings=4096),
    max_position_embeddings=131072, tie_word_embeddings=False, pad_token_id=0)

PRESETS: dict[str, LLMConfig] = {"llama_3_1_8b": LLAMA_3_1_8B, "phi_3_5_mini": PHI_3_5_MINI}
