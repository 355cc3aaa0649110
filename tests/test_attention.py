"""The XLA attention (fusion_jax.models.attention) against torch autograd of the same softmax
attention in float64: grouped heads, masks with a row whose keys are all masked, the FUSION
authors' uniform text rows."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusion_jax.models.attention import dot_product_attention


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
