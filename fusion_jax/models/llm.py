"""The FUSION language model: one Linen decoder for Llama-3.1 and Phi-3.5 (pre-norm, RMSNorm,
SwiGLU, rotary attention with grouped-query heads).

Parameter tree (unscanned; conversion to and from transformers is a rename, see
fusion_jax/convert/hf_llm.py):

  embed_tokens/embedding                       (V, D)        ('vocab', 'embed')
  layers_{i}/input_layernorm/scale             (D,)          ('norm',)
  layers_{i}/self_attn/q_proj/kernel           (D, H, hd)    ('embed', 'heads', 'head_dim')
  layers_{i}/self_attn/{k,v}_proj/kernel       (D, KV, hd)   ('embed', 'kv_heads', 'head_dim')
  layers_{i}/self_attn/o_proj/kernel           (H, hd, D)    ('heads', 'head_dim', 'embed')
  layers_{i}/post_attention_layernorm/scale    (D,)
  layers_{i}/mlp/{gate,up}_proj/kernel         (D, F)        ('embed', 'mlp')
  layers_{i}/mlp/down_proj/kernel              (F, D)        ('mlp', 'embed')
  norm/scale                                   (D,)
  lm_head/kernel                               (D, V)        ('embed', 'vocab')  (absent if tied)

With `scan_layers=True` the layers are one `layers` subtree whose leaves carry a leading
('layers',) axis; `stack_layers` / `unstack_layers` convert between the two layouts.

Calling convention (pure functional, `apply(..., method=...)`):
  Decoder.embed(input_ids (B, S)) -> (B, S, D)
  Decoder.__call__(inputs_embeds (B, S, D), positions (B, S), token_mask (B, S), *,
                   cache=None, hook=None) -> (hidden (B, S, D) after the final norm, new_cache)
  Decoder.logits(hidden (B, S, D)) -> (B, S, V) float32
  Decoder.forward(input_ids, positions, token_mask, *, cache=None) -> (logits, new_cache)

`hook(layer_index, h) -> h` runs after decoder layer i (FUSION's interaction layers). It may call
Linen submodules of the module that owns the Decoder; their parameters live under that owner.
Hooks need the unrolled layer loop: with scan_layers=True a hook raises ValueError (a scanned
stack has one traced body; running different per-layer modules between iterations would need
the stack cut into segments, which FUSION's few-layer LLM does not need for compile time).

KV cache (generation): `init_cache(cfg, batch, max_len)` gives
  {'k', 'v': per layer (B, max_len, KV, hd) — a tuple of L arrays, or one (L, B, max_len, KV, hd)
   array when scan_layers — 'valid': (B, max_len) bool, 'index': (B,) int32 next write slot}.
A call with a cache writes its S new keys/values at slots index[b] .. index[b]+S-1 of example b,
marks them valid where token_mask is True, and advances index[b] by the number of real tokens.
Queries attend to valid slots at or before their own slot. So a right-padded prompt batch is
prefilled with one call (index 0) and every decode step (S = 1) writes at each example's own
length, overwriting that example's padding slots. Shapes are static; callers keep
index + S <= max_len (dynamic_update_slice clamps out-of-range writes). LongRoPE picks its
factor set per call from the largest position in the call (transformers' rule); keys already
cached keep their rotation, so generation that crosses original_max_position_embeddings should
re-prefill, as transformers does (see fusion_jax.models.rope.longrope_is_long).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from fusion_jax.models import remat as remat_lib
from fusion_jax.models.attention import causal_mask, dot_product_attention
from fusion_jax.models.layers import DenseGeneral
from fusion_jax.models.rope import (Llama3Scaling, LongRopeScaling, RopeScaling, RopeTables,
                                    apply_rope, make_rope_tables, rope_cos_sin, scaling_from_dict,
                                    scaling_to_dict)

Hook = Callable[[int, jax.Array], jax.Array]
ARCHS = ("llama", "phi3")


def constrain(x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
  """Logical sharding constraint; a no-op outside a mesh / logical-rules context."""
  return nn.with_logical_constraint(x, names)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


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
  remat_policy: str = "none"       # see fusion_jax.models.remat.POLICY_NAMES
  scan_layers: bool = False

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"LLMConfig.arch={self.arch!r}; supported: {ARCHS}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LLMConfig: num_heads {self.num_heads} is not a multiple of "
                       f"num_kv_heads {self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LLMConfig: head_dim {self.head_dim} must be even for RoPE")
    remat_lib.policy_from_name(self.remat_policy)  # clear error on a bad name
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
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"LLMConfig.from_dict: unknown keys {unknown}; valid keys {sorted(names)}")
    d = dict(d)
    if "rope_scaling" in d and isinstance(d["rope_scaling"], Mapping):
      d["rope_scaling"] = scaling_from_dict(d["rope_scaling"])
    return cls(**d)

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


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=32)
def rope_tables(cfg: LLMConfig) -> RopeTables:
  """The config's static RoPE constants (numpy; computed once per config)."""
  return make_rope_tables(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)


def _init(cfg: LLMConfig, names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(cfg.initializer_range), names)


class RMSNorm(nn.Module):
  """x / rms(x) * scale, statistics in float32 (as transformers' LlamaRMSNorm / Phi3RMSNorm)."""
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), self.param_dtype)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
    return jnp.asarray(scale, self.dtype) * y.astype(self.dtype)


def _write_slots(buf: jax.Array, new: jax.Array, index: jax.Array) -> jax.Array:
  """buf (B, M, ...) <- new (B, S, ...) at per-example slot index (B,)."""
  def one(b, n, i):
    return jax.lax.dynamic_update_slice(b, n.astype(b.dtype), (i,) + (0,) * (b.ndim - 1))
  return jax.vmap(one)(buf, new, index)


class SelfAttention(nn.Module):
  """Rotary grouped-query self-attention with an optional per-layer KV cache."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               write_index: jax.Array | None, kv: dict[str, jax.Array] | None):
    """x (B, S, D) -> ((B, S, D), new kv {'k','v': (B, M, KV, hd)} or None)."""
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    proj = functools.partial(DenseGeneral, axis=-1, use_bias=False, dtype=dt, param_dtype=pdt,
                             kernel_init=nn.initializers.normal(cfg.initializer_range))
    q = proj((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), name="q_proj")(x)
    k = proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="k_proj")(x)
    v = proj((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"), name="v_proj")(x)
    q = checkpoint_name(q, remat_lib.QUERY_PROJ)
    k = checkpoint_name(k, remat_lib.KEY_PROJ)
    v = checkpoint_name(v, remat_lib.VALUE_PROJ)
    q = constrain(apply_rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = constrain(apply_rope(k, cos, sin), ("batch", "length", "kv_heads", "head_dim"))
    v = constrain(v, ("batch", "length", "kv_heads", "head_dim"))
    new_kv = None
    if kv is not None:
      # Keys are cached after rotation, so slots need not equal positions.
      k = constrain(_write_slots(kv["k"], k, write_index), ("batch", "length", "kv_heads", "head_dim"))
      v = constrain(_write_slots(kv["v"], v, write_index), ("batch", "length", "kv_heads", "head_dim"))
      new_kv = {"k": k, "v": v}
      k, v = k.astype(dt), v.astype(dt)
    out = dot_product_attention(q, k, v, mask)
    out = checkpoint_name(out, remat_lib.ATTN_OUT)
    out = constrain(out, ("batch", "length", "heads", "head_dim"))
    y = DenseGeneral(cfg.hidden_size, ("heads", "head_dim", "embed"), axis=(-2, -1), use_bias=False,
                     dtype=dt, param_dtype=pdt, kernel_init=nn.initializers.normal(cfg.initializer_range),
                     name="o_proj")(out)
    return y, new_kv


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""
  cfg: LLMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    dense = functools.partial(nn.Dense, use_bias=False, dtype=jnp.dtype(cfg.dtype),
                              param_dtype=jnp.dtype(cfg.param_dtype))
    gate = dense(cfg.intermediate_size, kernel_init=_init(cfg, ("embed", "mlp")), name="gate_proj")(x)
    up = dense(cfg.intermediate_size, kernel_init=_init(cfg, ("embed", "mlp")), name="up_proj")(x)
    h = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    h = checkpoint_name(h, remat_lib.MLP_HIDDEN)
    return dense(cfg.hidden_size, kernel_init=_init(cfg, ("mlp", "embed")), name="down_proj")(h)


class DecoderLayer(nn.Module):
  """Pre-norm block: h + attn(norm(h)); h + mlp(norm(h)).

  Signature is nn.scan-ready: carry `h` first, then broadcast inputs, then the scanned per-layer
  cache; returns (carry, per-layer output).
  """
  cfg: LLMConfig

  @nn.compact
  def __call__(self, h: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
               write_index: jax.Array | None, kv: dict[str, jax.Array] | None):
    cfg = self.cfg
    norm = functools.partial(RMSNorm, cfg.rms_norm_eps, jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype))
    a, new_kv = SelfAttention(cfg, name="self_attn")(
        norm(name="input_layernorm")(h), cos, sin, mask, write_index, kv)
    h = constrain(h + a, ("batch", "length", "embed"))
    h = h + MLP(cfg, name="mlp")(norm(name="post_attention_layernorm")(h))
    return constrain(h, ("batch", "length", "embed")), new_kv


class Decoder(nn.Module):
  """Token embedding, L decoder layers, final RMSNorm and LM head (see module docstring)."""
  cfg: LLMConfig

  def setup(self):
    cfg = self.cfg
    dt, pdt = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=pdt,
                                 embedding_init=_init(cfg, ("vocab", "embed")))
    # inside nn.scan the scan itself stops CSE across the remat boundary.
    block = remat_lib.remat(DecoderLayer, cfg.remat_policy, prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
          length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
    else:
      # A list attribute names its modules layers_0 .. layers_{L-1}.
      self.layers = [block(cfg) for _ in range(cfg.num_layers)]
    self.norm = RMSNorm(cfg.rms_norm_eps, dt, pdt)
    if not cfg.tie_word_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                              kernel_init=_init(cfg, ("embed", "vocab")))

  def embed(self, input_ids: jax.Array) -> jax.Array:
    """(B, S) int -> (B, S, D) compute dtype."""
    # Gather the fsdp shards of the table first (as FSDP does for every weight): a lookup into
    # a table split on its embed axis cannot produce batch-sharded rows without replicating.
    table = constrain(jnp.asarray(self.embed_tokens.embedding, jnp.dtype(self.cfg.dtype)),
                      ("vocab", None))
    return constrain(jnp.take(table, input_ids, axis=0), ("batch", "length", "embed"))

  def logits(self, hidden: jax.Array) -> jax.Array:
    """(B, S, D) -> (B, S, V) float32 (the loss wants fp32 logits)."""
    if self.cfg.tie_word_embeddings:
      out = self.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return constrain(out.astype(jnp.float32), ("batch", "length", "vocab"))

  def __call__(self, inputs_embeds: jax.Array, positions: jax.Array, token_mask: jax.Array, *,
               cache: dict[str, Any] | None = None, hook: Hook | None = None):
    """(B, S, D) embeddings -> (hidden (B, S, D) after the final norm, new cache or None)."""
    cfg = self.cfg
    if hook is not None and cfg.scan_layers:
      raise ValueError("Decoder: a per-layer hook needs scan_layers=False (a scanned layer stack "
                       "cannot run other modules between its iterations); set "
                       "LLMConfig.scan_layers=False for models with interaction layers")
    if self.is_initializing():
      # Create every parameter whatever entry point init uses.
      self.logits(self.embed(jnp.zeros((1, 1), jnp.int32)))
    token_mask = token_mask.astype(jnp.bool_)
    h = constrain(inputs_embeds.astype(jnp.dtype(cfg.dtype)), ("batch", "length", "embed"))
    cos, sin = rope_cos_sin(rope_tables(cfg), positions)
    if cache is None:
      mask, write_index, new_meta = causal_mask(token_mask), None, None
    else:
      mask, write_index, new_meta = _cache_mask(cache, token_mask)

    if cfg.scan_layers:
      kv = None if cache is None else {"k": cache["k"], "v": cache["v"]}
      h, new_kv = self.layers(h, cos, sin, mask, write_index, kv)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        kv = None if cache is None else {"k": cache["k"][i], "v": cache["v"][i]}
        h, kv = layer(h, cos, sin, mask, write_index, kv)
        if kv is not None:
          new_k.append(kv["k"])
          new_v.append(kv["v"])
        if hook is not None:
          h = constrain(hook(i, h), ("batch", "length", "embed"))
      new_kv = None if cache is None else {"k": tuple(new_k), "v": tuple(new_v)}
    h = self.norm(h)
    new_cache = None if cache is None else {**new_kv, **new_meta}
    return constrain(h, ("batch", "length", "embed")), new_cache

  def forward(self, input_ids: jax.Array, positions: jax.Array, token_mask: jax.Array, *,
              cache: dict[str, Any] | None = None, hook: Hook | None = None):
    """Token ids -> (logits (B, S, V) float32, new cache or None)."""
    h, new_cache = self(self.embed(input_ids), positions, token_mask, cache=cache, hook=hook)
    return self.logits(h), new_cache

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
    """Empty cache for this decoder's config (works on an unbound module)."""
    return init_cache(self.cfg, batch, max_len, dtype)


def _cache_mask(cache: Mapping[str, Any], token_mask: jax.Array):
  """Attention mask (B, 1, S, M), write slots (B,) and the cache's new 'valid'/'index'."""
  index = cache["index"].astype(jnp.int32)
  valid = _write_slots(cache["valid"], token_mask, index)
  m = valid.shape[1]
  s = token_mask.shape[1]
  q_slot = index[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # (B, S)
  allowed = jnp.arange(m, dtype=jnp.int32)[None, None, :] <= q_slot[:, :, None]  # (B, S, M)
  mask = (allowed & valid[:, None, :])[:, None]
  new_index = index + token_mask.sum(axis=-1).astype(jnp.int32)
  return mask, index, {"valid": valid, "index": new_index}


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype: Any = None) -> dict[str, Any]:
  """Empty KV cache: k/v zeros (per layer (B, max_len, KV, hd)), valid all False, index 0.

  dtype defaults to the compute dtype. With scan_layers the per-layer arrays are stacked on a
  leading layer axis (what nn.scan consumes); otherwise they are a tuple of L arrays.
  """
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    k = jnp.zeros((cfg.num_layers,) + shape, dtype)
    v = jnp.zeros((cfg.num_layers,) + shape, dtype)
  else:
    k = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    v = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
  return {"k": k, "v": v, "valid": jnp.zeros((batch, max_len), jnp.bool_),
          "index": jnp.zeros((batch,), jnp.int32)}


def cache_logical_axes(cfg: LLMConfig) -> dict[str, Any]:
  """Logical PartitionSpecs matching `init_cache(cfg, ...)` (for shardings of a donated cache)."""
  P = jax.sharding.PartitionSpec
  per = ("batch", "length", "kv_heads", "head_dim")
  if cfg.scan_layers:
    kv = P("layers", *per)
    k, v = kv, kv
  else:
    k = tuple(P(*per) for _ in range(cfg.num_layers))
    v = tuple(P(*per) for _ in range(cfg.num_layers))
  return {"k": k, "v": v, "valid": P("batch", "length"), "index": P("batch")}


# ---------------------------------------------------------------------------------------------
# Layer layout helpers
# ---------------------------------------------------------------------------------------------


def _stack(xs):
  if all(isinstance(x, np.ndarray) for x in xs):
    return np.stack(xs)
  return jnp.stack(xs)


def stack_layers(params: Mapping[str, Any], num_layers: int | None = None) -> dict[str, Any]:
  """Unscanned params (layers_0 .. layers_{L-1}) -> scanned layout (one stacked `layers`).

  Works on the bare params tree; other entries are kept. Numpy in, numpy out.
  """
  keys = sorted((k for k in params if k.startswith("layers_")), key=lambda k: int(k.split("_")[1]))
  if num_layers is not None and len(keys) != num_layers:
    raise ValueError(f"stack_layers: found {len(keys)} layers_i entries, expected {num_layers}")
  if [int(k.split("_")[1]) for k in keys] != list(range(len(keys))):
    raise ValueError(f"stack_layers: layer entries are not contiguous from 0: {keys}")
  if not keys:
    raise ValueError("stack_layers: no layers_i entries (already stacked?)")
  out = {k: v for k, v in params.items() if not k.startswith("layers_")}
  out["layers"] = jax.tree.map(lambda *xs: _stack(xs), *[params[k] for k in keys])
  return out


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned params (`layers` with a leading layer axis) -> layers_0 .. layers_{L-1}."""
  if "layers" not in params:
    raise ValueError("unstack_layers: no stacked 'layers' entry (already unstacked?)")
  stacked = params["layers"]
  n = jax.tree.leaves(stacked)[0].shape[0]
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(n):
    out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
