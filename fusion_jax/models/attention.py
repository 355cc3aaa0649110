"""Scaled dot-product attention shared by the LLM, the ViT and the interaction layers.

One function so that every attention in FUSION has the same numerics: scores and softmax in
float32 whatever the compute dtype, grouped-query heads without materialising repeated K/V.

In float32 (CPU runs, fp32 configs) the backward is written by hand, as flash attention's:
dS = P * (dP - D) with D = rowsum(dO * O) per query, read from the (S, hd) output instead of
softmax's autodiff pass over the (S, S) probabilities, and the forward keeps the unnormalised
exp(S - max) with the 1 / rowsum applied to the (S, hd) output. On a 2-core CPU at the main
job's decoder shapes (16 x 192 tokens, 4 heads of 32) that cut attention's forward + backward
from 72-77 to 38-52 ms per layer (docs/performance.md, "Where a CPU step's time goes"). Other
dtypes keep jax's autodiff of the same forward.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    mask: jax.Array | None = None,
    *,
    uniform_rows: jax.Array | None = None,
    scale: float | None = None,
) -> jax.Array:
  """Softmax attention with grouped-query support.

  Args:
    q: (B, Sq, H, hd) queries.
    k: (B, Sk, KV, hd) keys; H must be a multiple of KV (GQA / MQA / MHA).
    v: (B, Sk, KV, hd) values.
    mask: bool, broadcastable to (B, H, Sq, Sk); True = may attend. None = attend everywhere.
    uniform_rows: bool (B, Sq); True rows ignore scores and mask and attend uniformly to all Sk
      keys. Reproduces the FUSION authors' early-layer text rows, whose scores are all set to
      the dtype minimum (softmax of a constant row is uniform).
    scale: score scale; default 1/sqrt(hd).

  Returns:
    (B, Sq, H, hd) in q's dtype.
  """
  b, sq, h, hd = q.shape
  kv = k.shape[2]
  if h % kv:
    raise ValueError(f"attention: {h} query heads not a multiple of {kv} key/value heads")
  scale = hd**-0.5 if scale is None else scale
  f32 = jnp.dtype(jnp.float32)
  if q.dtype == f32 and k.dtype == f32 and v.dtype == f32:
    return _attention_f32(q, k, v, mask, uniform_rows, float(scale))
  probs = jax.nn.softmax(_scores(q, k, mask, uniform_rows, scale), axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, sq, h, hd).astype(q.dtype)


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array | None, uniform_rows: jax.Array | None,
            scale: float) -> jax.Array:
  """(B, KV, G, Sq, Sk) float32 scaled scores; masked keys at the float32 minimum, uniform rows
  all 0."""
  b, sq, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, sq, kv, h // kv, hd)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if mask is not None:
    m = jnp.broadcast_to(mask, (b, h, sq, k.shape[1])).reshape(b, kv, h // kv, sq, k.shape[1])
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
  if uniform_rows is not None:
    scores = jnp.where(uniform_rows[:, None, None, :, None], 0.0, scores)
  return scores


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _attention_f32(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None,
                   uniform_rows: jax.Array | None, scale: float) -> jax.Array:
  return _attention_f32_fwd(q, k, v, mask, uniform_rows, scale)[0]


def _attention_f32_fwd(q, k, v, mask, uniform_rows, scale):
  b, sq, h, hd = q.shape
  scores = _scores(q, k, mask, uniform_rows, scale)
  top = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores - top)  # (B, KV, G, Sq, Sk); 0 at masked keys
  inv = 1.0 / jnp.sum(e, axis=-1)  # (B, KV, G, Sq)
  out = jnp.einsum("bkgqs,bskd->bqkgd", e, v) * jnp.moveaxis(inv, 3, 1)[..., None]
  # Rows whose scores are constants pass no gradient to them: uniform rows, and rows with
  # every key masked (softmax of the float32 minimum everywhere is uniform too).
  live = top[..., 0] > jnp.finfo(jnp.float32).min
  if uniform_rows is not None:
    live = live & ~uniform_rows[:, None, None, :]
  return out.reshape(b, sq, h, hd), (q, k, v, e, inv, out, live)


def _attention_f32_bwd(scale, res, d_out):
  """Flash attention's backward with the saved exp(S - max): P = e * inv, dV = P^T dO,
  dS = P * (dO V^T - rowsum(dO * O)) * scale, dQ = dS K, dK = dS^T Q."""
  q, k, v, e, inv, out, live = res
  b, sq, h, hd = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, sq, kv, h // kv, hd)
  do = d_out.reshape(qg.shape)
  dv = jnp.einsum("bkgqs,bqkgd->bskd", e, do * jnp.moveaxis(inv, 3, 1)[..., None])
  dp = jnp.einsum("bqkgd,bskd->bkgqs", do, v)
  rows = jnp.moveaxis(jnp.sum(do * out, axis=-1), 1, 3)  # (B, KV, G, Sq)
  ds = e * jnp.where(live, inv * jnp.float32(scale), 0.0)[..., None] * (dp - rows[..., None])
  dq = jnp.einsum("bkgqs,bskd->bqkgd", ds, k).reshape(q.shape)
  dk = jnp.einsum("bkgqs,bqkgd->bskd", ds, qg)
  return dq, dk, dv, None, None


_attention_f32.defvjp(_attention_f32_fwd, _attention_f32_bwd)


def causal_mask(token_mask: jax.Array) -> jax.Array:
  """(B, S) validity -> (B, 1, S, S) causal + key-padding mask (True = may attend)."""
  s = token_mask.shape[1]
  causal = jnp.tril(jnp.ones((s, s), dtype=jnp.bool_))
  return causal[None, None] & token_mask[:, None, None, :]
