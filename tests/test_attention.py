"""The XLA attention's float32 path (a hand-written flash-style backward) against torch autograd
of the same softmax attention in float64, and its other-dtype path against jax's autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusion_jax.models.attention import _scores, dot_product_attention


def _torch_attention(q, k, v, mask, uniform_rows, scale):
  """float64 reference: grouped heads repeated, masked scores at float32's minimum (as ours),
  uniform rows' scores 0."""
  h, kv = q.shape[2], k.shape[2]
  qt, kt, vt = (x.permute(0, 2, 1, 3) for x in (q, k, v))  # (B, heads, S, hd)
  kt, vt = kt.repeat_interleave(h // kv, dim=1), vt.repeat_interleave(h // kv, dim=1)
  s = qt @ kt.transpose(-1, -2) * scale
  if mask is not None:
    s = torch.where(torch.as_tensor(np.asarray(mask)), s, float(np.finfo(np.float32).min))
  if uniform_rows is not None:
    s = torch.where(torch.as_tensor(np.asarray(uniform_rows))[:, None, :, None], 0.0, s)
  return (torch.softmax(s, dim=-1) @ vt).permute(0, 2, 1, 3)


@pytest.mark.parametrize("case", ["mask", "uniform_rows", "no_mask"])
def test_float32_attention_matches_torch_float64(case):
  rng = np.random.default_rng(0)
  b, s, h, kv, hd = 3, 24, 4, 2, 8
  q, k, v, w = (rng.normal(size=(b, s, n, hd)) for n in (h, kv, kv, h))
  mask = uniform = None
  if case != "no_mask":
    causal = np.tril(np.ones((s, s), bool))
    mask = (causal[None, None] & (rng.random((b, 1, 1, s)) < 0.8))
    mask[0, 0, 5] = False  # a row with every key masked: uniform, no gradient to its scores
  if case == "uniform_rows":
    uniform = rng.random((b, s)) < 0.3
  scale = hd**-0.5

  def loss(q, k, v):
    out = dot_product_attention(q, k, v, None if mask is None else jnp.asarray(mask),
                                uniform_rows=None if uniform is None else jnp.asarray(uniform))
    return jnp.sum(out * w.astype(np.float32)), out

  (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
      *(jnp.asarray(x, jnp.float32) for x in (q, k, v)))
  tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
  ref = _torch_attention(tq, tk, tv, mask, uniform, scale)
  (ref * torch.tensor(w)).sum().backward()
  np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=1e-5, rtol=1e-5)
  for g, t in zip(grads, (tq, tk, tv)):
    np.testing.assert_allclose(np.asarray(g), t.grad.numpy(), atol=1e-5, rtol=1e-5)


def test_bfloat16_attention_keeps_autodiff_of_the_softmax():
  """Other dtypes: the probabilities are rounded to v's dtype before the value product, and the
  gradients are jax's autodiff of exactly that (unchanged by the float32 path)."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 16, 2, 8)), jnp.bfloat16) for _ in range(3))
  mask = jnp.asarray(np.tril(np.ones((16, 16), bool)))[None, None]

  def reference(q, k, v):
    probs = jax.nn.softmax(_scores(q, k, mask, None, 8**-0.5), axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v, preferred_element_type=jnp.float32)
    return jnp.sum(out.reshape(q.shape).astype(q.dtype).astype(jnp.float32))

  def ours(q, k, v):
    return jnp.sum(dot_product_attention(q, k, v, mask).astype(jnp.float32))

  for a, b in zip(jax.grad(reference, argnums=(0, 1, 2))(q, k, v),
                  jax.grad(ours, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
