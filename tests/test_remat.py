"""Remat policies by name (fusion_jax/parallel/remat.py)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

from fusion_jax.parallel import remat


def test_unknown_policy_names_the_valid_ones():
  with pytest.raises(ValueError, match="dots_with_no_batch_dims_and_attention"):
    remat.policy_from_name("dots_no_batch")


@pytest.mark.parametrize("policy, forward_calls", [("dots_with_no_batch_dims", 2),
                                                   ("dots_with_no_batch_dims_and_attention", 1)])
def test_attention_policy_keeps_the_cudnn_forward(monkeypatch, policy, forward_calls):
  """The gradient of a checkpointed cuDNN attention runs its forward kernel once under
  ..._and_attention (saved residuals) and twice under dots_with_no_batch_dims (recomputed).
  Traced only (no cuDNN here): the version checks are stubbed so the cuDNN primitives appear in
  the jaxpr, which is what the policy sees."""
  monkeypatch.setattr(cudnn_attention, "check_cudnn_version", lambda *a, **k: 91000)
  monkeypatch.setattr(cudnn_attention, "check_compute_capability", lambda *a, **k: True)

  def loss(x, w):  # x (S, D), w (D, D)
    h = (x @ w).reshape(1, 128, 2, 64)
    out = jax.nn.dot_product_attention(h, h, h, is_causal=True, implementation="cudnn")
    return jnp.sum(jnp.sin(out.astype(jnp.float32)))

  grad = jax.grad(jax.checkpoint(loss, policy=remat.policy_from_name(policy)))
  x = jnp.ones((128, 128), jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(grad)(x, x))
  assert jaxpr.count("dot_product_attention_fwd") == forward_calls
  assert jaxpr.count("dot_product_attention_bwd") == 1


def test_attention_policy_keeps_the_splash_forward():
  """The same for the TPU splash kernel (Pallas interpret mode; its residuals carry the
  remat.ATTN_RESIDUALS tag). Compiled, so that XLA drops the recompute the policy makes dead:
  each kernel's grid is one while loop, and under ..._and_attention the step has as many as
  without remat, one fewer than under dots_with_no_batch_dims."""
  from fusion_jax.models import attention_kernels

  def loss(x):  # x (S, D)
    h = x.reshape(1, 128, 2, 64)
    out = attention_kernels.splash_attention(h, h, h, jnp.ones((1, 128), jnp.int32),
                                             interpret=True)
    return jnp.sum(jnp.sin(out))

  def kernel_loops(policy: str) -> int:
    fn = loss if policy == "none" else jax.checkpoint(loss, policy=remat.policy_from_name(policy))
    hlo = jax.jit(jax.value_and_grad(fn)).lower(jnp.ones((128, 128))).compile().as_text()
    return len(re.findall(r"= .*\bwhile\(", hlo))

  loops = {p: kernel_loops(p) for p in ("none", "dots_with_no_batch_dims",
                                        "dots_with_no_batch_dims_and_attention")}
  assert loops["dots_with_no_batch_dims_and_attention"] == loops["none"], loops
  assert loops["dots_with_no_batch_dims"] == loops["none"] + 1, loops
