"""Scaled dot-product attention shared by the LLM, the ViT and the interaction layers.

One function so that every attention in FUSION has the same numerics: scores and softmax in
float32 whatever the compute dtype, grouped-query heads without materialising repeated K/V.
"""
from __future__ import annotations

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
  g = h // kv
  scale = hd**-0.5 if scale is None else scale
  qg = q.reshape(b, sq, kv, g, hd)
  scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k, preferred_element_type=jnp.float32)
  scores = scores * jnp.float32(scale)
  if mask is not None:
    m = jnp.broadcast_to(mask, (b, h, sq, k.shape[1])).reshape(b, kv, g, sq, k.shape[1])
    scores = jnp.where(m, scores, jnp.finfo(jnp.float32).min)
  if uniform_rows is not None:
    scores = jnp.where(uniform_rows[:, None, None, :, None], 0.0, scores)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
  return out.reshape(b, sq, h, hd).astype(q.dtype)


def causal_mask(token_mask: jax.Array) -> jax.Array:
  """(B, S) validity -> (B, 1, S, S) causal + key-padding mask (True = may attend)."""
  s = token_mask.shape[1]
  causal = jnp.tril(jnp.ones((s, s), dtype=jnp.bool_))
  return causal[None, None] & token_mask[:, None, None, :]
