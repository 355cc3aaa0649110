"""Rotary position embeddings: plain, Llama-3.1 ('llama3') and Phi-3 LongRoPE ('longrope').

Inverse frequencies are computed once in numpy float32 with the same operation order as
transformers 5.23 (`modeling_rope_utils`), so imported checkpoints reproduce its logits. The
rotation itself is applied in float32 (transformers casts cos/sin to the compute dtype first;
in float32 the two are identical, in bfloat16 ours is slightly more accurate).

LongRoPE regime: transformers picks the short or the long factor set for the WHOLE batch from
`max(position_ids) + 1 > original_max_position_embeddings` (`dynamic_rope_update` ->
`longrope_frequency_update`), recomputed at every forward. We do the same, traced, from the
positions passed in. The attention factor (cos/sin multiplier) is fixed at construction:
`attention_factor` if given, else sqrt(1 + ln(factor) / ln(original_max)) with
`factor = max_position_embeddings / original_max` when not given (1.0 when factor <= 1).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Llama3Scaling:
  """Llama-3.1 frequency-band scaling (transformers rope_type 'llama3')."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  rope_type = "llama3"  # class attribute, not a field


@dataclasses.dataclass(frozen=True)
class LongRopeScaling:
  """Phi-3 LongRoPE (transformers rope_type 'longrope', formerly 'su').

  short_factor / long_factor: one divisor per rotary frequency (head_dim // 2 values).
  factor / attention_factor: optional overrides exactly as in transformers; None = derived.
  """
  short_factor: tuple[float, ...]
  long_factor: tuple[float, ...]
  original_max_position_embeddings: int = 4096
  factor: float | None = None
  attention_factor: float | None = None

  rope_type = "longrope"

  def __post_init__(self):
    # Accept lists from JSON and keep the dataclass hashable.
    object.__setattr__(self, "short_factor", tuple(float(x) for x in self.short_factor))
    object.__setattr__(self, "long_factor", tuple(float(x) for x in self.long_factor))


RopeScaling = Llama3Scaling | LongRopeScaling


def scaling_to_dict(scaling: RopeScaling | None) -> dict[str, Any] | None:
  if scaling is None:
    return None
  d = dataclasses.asdict(scaling)
  if isinstance(scaling, LongRopeScaling):
    d["short_factor"] = list(d["short_factor"])
    d["long_factor"] = list(d["long_factor"])
  return {"rope_type": scaling.rope_type, **d}


def scaling_from_dict(d: dict[str, Any] | None) -> RopeScaling | None:
  """Inverse of `scaling_to_dict`; None or rope_type 'default' -> None."""
  if d is None:
    return None
  d = dict(d)
  kind = d.pop("rope_type", d.pop("type", None))
  if kind in (None, "default"):
    return None
  if kind == "llama3":
    return Llama3Scaling(**{k: d[k] for k in d if k in _fields(Llama3Scaling)})
  if kind in ("longrope", "su"):
    return LongRopeScaling(**{k: d[k] for k in d if k in _fields(LongRopeScaling)})
  raise ValueError(f"rope scaling type {kind!r} is not supported; supported: 'llama3', "
                   "'longrope' (alias 'su'), or None/'default' for plain RoPE")


def _fields(cls) -> set[str]:
  return {f.name for f in dataclasses.fields(cls)}


def _default_inv_freq(head_dim: int, theta: float) -> np.ndarray:
  # torch: 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)), all float32.
  exponent = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)


def _llama3_inv_freq(head_dim: int, theta: float, s: Llama3Scaling) -> np.ndarray:
  inv_freq = _default_inv_freq(head_dim, theta)
  low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  wavelen = (np.float32(2 * math.pi) / inv_freq).astype(np.float32)
  inv_llama = np.where(wavelen > low_freq_wavelen, inv_freq / np.float32(s.factor), inv_freq)
  smooth = ((np.float32(s.original_max_position_embeddings) / wavelen - np.float32(s.low_freq_factor))
            / np.float32(s.high_freq_factor - s.low_freq_factor)).astype(np.float32)
  smoothed = ((1 - smooth) * inv_llama / np.float32(s.factor) + smooth * inv_llama).astype(np.float32)
  is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
  return np.where(is_medium, smoothed, inv_llama).astype(np.float32)


def _longrope_inv_freq(head_dim: int, theta: float, ext: tuple[float, ...]) -> np.ndarray:
  if len(ext) != head_dim // 2:
    raise ValueError(f"longrope: {len(ext)} factors given, head_dim {head_dim} needs {head_dim // 2}")
  shape = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  return (np.float32(1.0) / (np.asarray(ext, np.float32) * (np.float32(theta) ** shape))).astype(np.float32)


def longrope_attention_factor(s: LongRopeScaling, max_position_embeddings: int) -> float:
  """cos/sin multiplier of LongRoPE, transformers' rule (see module docstring)."""
  if s.attention_factor is not None:
    return float(s.attention_factor)
  factor = s.factor
  if factor is None:
    factor = max_position_embeddings / s.original_max_position_embeddings
  if factor <= 1.0:
    return 1.0
  return math.sqrt(1 + math.log(factor) / math.log(s.original_max_position_embeddings))


@dataclasses.dataclass(frozen=True)
class RopeTables:
  """Static per-model RoPE constants (numpy, built once at trace time).

  inv_freq: (hd/2,) float32 (short set for LongRoPE); long_inv_freq: (hd/2,) or None;
  switch_at: LongRoPE original max (long set when max position + 1 exceeds it); scale: cos/sin
  multiplier.
  """
  inv_freq: np.ndarray
  long_inv_freq: np.ndarray | None
  switch_at: int | None
  scale: float


def make_rope_tables(head_dim: int, theta: float, scaling: RopeScaling | None,
                     max_position_embeddings: int) -> RopeTables:
  if scaling is None:
    return RopeTables(_default_inv_freq(head_dim, theta), None, None, 1.0)
  if isinstance(scaling, Llama3Scaling):
    return RopeTables(_llama3_inv_freq(head_dim, theta, scaling), None, None, 1.0)
  if isinstance(scaling, LongRopeScaling):
    return RopeTables(
        _longrope_inv_freq(head_dim, theta, scaling.short_factor),
        _longrope_inv_freq(head_dim, theta, scaling.long_factor),
        int(scaling.original_max_position_embeddings),
        longrope_attention_factor(scaling, max_position_embeddings))
  raise TypeError(f"unknown rope scaling {scaling!r}")


def longrope_is_long(tables: RopeTables, max_position: int) -> bool:
  """Host-side: does a sequence whose largest position is `max_position` use the long set?

  Generation code uses it to notice a regime change mid-decode (transformers then recomputes
  the whole cache, Phi3ForCausalLM.prepare_inputs_for_generation); keys already in a cache
  keep the rotation they were written with.
  """
  return tables.switch_at is not None and max_position + 1 > tables.switch_at


def rope_cos_sin(tables: RopeTables, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """positions (B, S) int -> cos, sin (B, S, hd) float32 (rotate-half layout, as transformers)."""
  inv = jnp.asarray(tables.inv_freq)
  if tables.long_inv_freq is not None:
    # One regime for the whole batch, chosen by its largest position (transformers' rule).
    is_long = jnp.max(positions) + 1 > tables.switch_at
    inv = jnp.where(is_long, jnp.asarray(tables.long_inv_freq), inv)
  freqs = positions.astype(jnp.float32)[..., None] * inv  # (B, S, hd/2)
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb) * tables.scale, jnp.sin(emb) * tables.scale


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x (B, S, N, hd), cos/sin (B, S, hd) -> rotated x in x's dtype (math in float32)."""
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)
