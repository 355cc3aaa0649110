"""FUSION interaction layer (Context-Aware Recursive Alignment Decoding, docs/model.md §7).

After selected LLM decoder layers, every latent token X_v of question l is refined by one
query-to-window cross attention against its w x w block of the pooled tile mosaic, conditioned
on the question's hidden state P_l:

  Z   = proj_in([P_l ; X_v])                                   (2D -> D)
  C   = proj_context(window_kk)                                (w*w tokens, D -> D)
  A   = o_proj(MHA(q_proj(Z), k_proj(C), v_proj(C)))           q/k/v_proj = LayerNorm + Linear
  Y   = norm(A + Z)
  X'v = linear_2(GELU(linear_1(Y))) + X_v

All Linears are bias-free, LayerNorms eps 1e-5 with bias, GELU exact (erf). Parameter names
mirror the authors' torch modules (see fusion_jax/convert/fusion_keys.py for the table).
"""
from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusion_jax.models.attention import dot_product_attention
from fusion_jax.parallel.sharding import constrain

# torch.nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): new FUSION modules
# start from random init in every recipe, so keep the authors' distribution.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

LN_EPS = 1e-5


def _dense(features: int, names: tuple[str, str], dtype, param_dtype, name: str) -> nn.Dense:
  return nn.Dense(
      features, use_bias=False, dtype=dtype, param_dtype=param_dtype,
      kernel_init=nn.with_logical_partitioning(_torch_linear_init, names), name=name)


def _layer_norm(dtype, param_dtype, name: str) -> nn.LayerNorm:
  # Two-pass variance like torch (the fast E[x^2]-E[x]^2 form drifts by ~1e-6).
  return nn.LayerNorm(
      epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), name=name)


class WindowCrossAttention(nn.Module):
  """Multi-head attention of each latent query against its w*w-token context window.

  Torch module `cross_attn`: q_proj / k_proj / v_proj are Sequential(LayerNorm, Linear) and
  o_proj a Linear. Keys and values are projected once per window and shared by the Lq
  questions that use it (slot l*q + kk always uses window kk).
  """
  num_heads: int = 16
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, context: jax.Array) -> jax.Array:
    """z: (B, Lq, q, D) queries; context: (B, q, K, D) windows. Returns (B, Lq, q, D)."""
    b, lq, q, d = z.shape
    k_len = context.shape[2]
    h = self.num_heads
    if d % h:
      raise ValueError(f"interaction: width {d} is not divisible by num_heads={h}")
    hd = d // h
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

    def proj(x, which):
      x = _layer_norm(name=f"{which}_proj_norm", **kw)(x)
      return _dense(d, ("embed", "heads"), name=f"{which}_proj", **kw)(x)

    qh = proj(z, "q")  # (B, Lq, q, D)
    kh = proj(context, "k")  # (B, q, K, D)
    vh = proj(context, "v")
    # Fold the window index into the batch: each of the B*q windows is attended by Lq queries.
    qh = qh.transpose(0, 2, 1, 3).reshape(b * q, lq, h, hd)
    kh = kh.reshape(b * q, k_len, h, hd)
    vh = vh.reshape(b * q, k_len, h, hd)
    out = dot_product_attention(qh, kh, vh)  # (B*q, Lq, H, hd), scale 1/sqrt(hd)
    out = out.reshape(b, q, lq, d).transpose(0, 2, 1, 3)
    return _dense(d, ("heads", "embed"), name="o_proj", **kw)(out)


class ProjOut(nn.Module):
  """Torch module `proj_out`: linear_1 -> GELU(exact) -> linear_2, bias-free."""
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _dense(d, ("embed", "mlp"), name="linear_1", **kw)(x)
    x = nn.gelu(x, approximate=False)
    return _dense(d, ("mlp", "embed"), name="linear_2", **kw)(x)


class InteractionLayer(nn.Module):
  """One FUSION interaction layer on gathered slots (width D inferred from the inputs).

  Attributes:
    num_heads: attention heads (16 in FUSION); must divide D.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  num_heads: int = 16
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, questions: jax.Array, latents: jax.Array, windows: jax.Array) -> jax.Array:
    """Refines latent tokens.

    Args:
      questions: (B, Lq, D) question hidden states P_l.
      latents: (B, Lq, q, D) latent hidden states X_v, slot v = l*q + kk at [l, kk].
      windows: (B, q, w*w, D) context windows; window kk serves latent kk of every question.

    Returns:
      (B, Lq, q, D) new latents X'_v, in latents' dtype.
    """
    b, lq, q, d = latents.shape
    if questions.shape != (b, lq, d):
      raise ValueError(f"interaction: questions {questions.shape} do not match latents "
                       f"{latents.shape}; expected (B, Lq, D) = {(b, lq, d)}")
    if windows.shape[0] != b or windows.shape[1] != q or windows.shape[3] != d:
      raise ValueError(f"interaction: windows {windows.shape} do not match latents "
                       f"{latents.shape}; expected (B, q, w*w, D) with q={q}, D={d}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = jnp.broadcast_to(questions[:, :, None, :], (b, lq, q, d))
    zin = jnp.concatenate([p, latents.astype(p.dtype)], axis=-1)  # [P_l ; X_v]
    z = _dense(d, ("mlp", "embed"), name="proj_in", **kw)(zin)
    z = constrain(z, ("batch", None, None, "embed"))
    c = _dense(d, ("mlp", "embed"), name="proj_context", **kw)(windows)
    c = constrain(c, ("batch", None, None, "embed"))
    a = WindowCrossAttention(self.num_heads, name="cross_attn", **kw)(z, c)
    y = _layer_norm(name="norm", **kw)(a + z)
    out = ProjOut(name="proj_out", **kw)(y) + latents
    return constrain(out.astype(latents.dtype), ("batch", None, None, "embed"))

  def refine(self, h: jax.Array, ctx: dict[str, jax.Array]) -> jax.Array:
    """The layer on a whole sequence (the Decoder's scanned-block contract): h (B, S, D) and
    ctx {'question_pos', 'latent_pos', 'windows'} (see apply_interaction) -> (B, S, D)."""
    return apply_interaction(self, h, ctx["question_pos"], ctx["latent_pos"], ctx["windows"])


def apply_interaction(
    layer: Callable[[jax.Array, jax.Array, jax.Array], jax.Array],
    h: jax.Array,
    question_pos: jax.Array,
    latent_pos: jax.Array,
    windows: jax.Array,
) -> jax.Array:
  """Gathers question/latent states from the sequence, runs `layer`, scatters latents back.

  All B * P * Lq * q slots run at once (static shape). Slots whose latent_pos is -1, or whose
  question (l = v // q) has question_pos -1, leave h untouched; their gathers read position 0
  so nothing non-finite is produced. A packed row (fusion_jax/models/batch_spec.py) holds P
  samples: each sample's latents are refined with its own questions and its own windows (the
  layer runs on B*P samples); without the P axis a row is one sample (P = 1).

  Args:
    layer: a bound InteractionLayer (or any callable with its signature).
    h: (B, S, D) hidden states.
    question_pos: (B, [P,] Lq) int, row index of sample p's question l's last token; -1 = pad.
    latent_pos: (B, [P,] Lq*q) int, row index of sample p's latent slot v = l*q + kk; -1 = pad.
    windows: (B, [P,] q, w*w, D) context windows (same for every question of a sample).

  Returns:
    (B, S, D) h with the valid latent positions replaced.
  """
  if question_pos.ndim == 2:  # one sample per row
    question_pos, latent_pos, windows = question_pos[:, None], latent_pos[:, None], windows[:, None]
  b, s, d = h.shape
  p_, lq = question_pos.shape[1:]
  if lq == 0 or latent_pos.shape[:2] != (b, p_) or latent_pos.shape[2] % lq:
    raise ValueError(f"apply_interaction: latent_pos {latent_pos.shape} is not (B, P, Lq*q) for "
                     f"question_pos {question_pos.shape}")
  q = latent_pos.shape[2] // lq
  if windows.shape[:3] != (b, p_, q):
    raise ValueError(f"apply_interaction: windows {windows.shape} are not (B, P, q, w*w, D) "
                     f"for latent_pos {latent_pos.shape} (q={q} latents per question)")
  h = constrain(h, ("batch", "length", "embed"))
  q_valid = question_pos >= 0  # (B, P, Lq)
  valid = ((latent_pos >= 0) & jnp.repeat(q_valid, q, axis=2)).reshape(b, p_ * lq * q)
  latent_pos = latent_pos.reshape(b, p_ * lq * q)
  qp = jnp.where(q_valid, question_pos, 0).reshape(b, p_ * lq)
  lp = jnp.where(valid, latent_pos, 0)
  p = jnp.take_along_axis(h, qp[:, :, None], axis=1)  # (B, P*Lq, D)
  x = jnp.take_along_axis(h, lp[:, :, None], axis=1)  # (B, P*Lq*q, D)
  x = constrain(x, ("batch", "length", "embed"))
  new = layer(p.reshape(b * p_, lq, d), x.reshape(b * p_, lq, q, d),
              windows.reshape((b * p_,) + windows.shape[2:])).reshape(b, p_ * lq * q, d)
  # Invalid slots point past the end of the sequence and are dropped by the scatter.
  dst = jnp.where(valid, latent_pos, s)
  # Per row (vmap): a batched scatter stays batch-sharded; a (row, dst) index array made the
  # partitioner gather the cotangent over the whole global batch on every chip.
  h = jax.vmap(lambda hr, dr, nr: hr.at[dr].set(nr, mode="drop"))(h, dst, new.astype(h.dtype))
  return constrain(h, ("batch", "length", "embed"))
