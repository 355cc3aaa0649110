"""Feature connector and the two vision<->LLM projectors (docs/model.md §3).

  features      = concat[hs[L'], mean(hs[0..k-1]), mean(hs[k..2k-1])], k = floor(L'/2)  (3Dv)
  mm_projector  = Linear(3Dv, D) -> GELU(exact) -> Linear(D, D)       vision -> LLM
  aux_projector = Linear(D, Dv)  -> GELU(exact) -> Linear(Dv, Dv)     LLM -> vision

The projectors are torch `nn.Sequential(Linear, GELU, Linear)`; their params are named
`linear_0` and `linear_2` after the Sequential indices, so torch `mm_projector.0.weight` is
`mm_projector/linear_0/kernel` (transposed) and `mm_projector.2.*` is `linear_2`.
"""
from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fusion_jax.parallel.sharding import constrain

# torch.nn.Linear's default weight init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)): the projectors
# start from random init in the authors' recipe.
_torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def connector_k(num_layers: int) -> int:
  """k = floor(L'/2): 13 for SigLIP (L' = 26), 19 for SigLIP2 giant (L' = 39)."""
  return num_layers // 2


def feature_connector(hidden_states: Sequence[jax.Array], k: int | None = None) -> jax.Array:
  """Multi-level vision features.

  Args:
    hidden_states: [hs0, ..., hsL'], each (B, M, Dv) (VisionTower.encode's output).
    k: group size; default floor(L'/2).

  Returns:
    (B, M, 3Dv) = concat[hs[L'], mean(hs[0..k-1]), mean(hs[k..2k-1])] in hs' dtype.
  """
  num_layers = len(hidden_states) - 1
  k = connector_k(num_layers) if k is None else k
  if not 1 <= k or 2 * k - 1 > num_layers:
    raise ValueError(f"feature_connector: k={k} needs 1 <= k and 2k-1 <= L'={num_layers} "
                     f"(got {len(hidden_states)} hidden states)")
  dtype = hidden_states[-1].dtype

  def mean(group):
    # Accumulate in float32: 13-19 bf16 states summed in bf16 would lose ~3 bits.
    return (sum(h.astype(jnp.float32) for h in group) / len(group)).astype(dtype)

  out = jnp.concatenate(
      [hidden_states[num_layers], mean(hidden_states[:k]), mean(hidden_states[k:2 * k])], axis=-1)
  return constrain(out, ("batch", "length", "embed"))


def _linear_gelu_linear(x: jax.Array, hidden: int, out: int, dtype, param_dtype) -> jax.Array:
  """Linear -> GELU(exact erf) -> Linear with biases, params linear_0 / linear_2 in the calling
  (compact) module. The hidden width is named 'mlp': both ends are model widths and flax
  forbids naming two dims of one kernel 'embed'."""
  kw = dict(dtype=dtype, param_dtype=param_dtype)
  y = nn.Dense(hidden, name="linear_0",
               kernel_init=nn.with_logical_partitioning(_torch_linear_init, ("embed", "mlp")),
               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), **kw)(x)
  y = constrain(nn.gelu(y, approximate=False), ("batch", "length", "mlp"))
  y = nn.Dense(out, name="linear_2",
               kernel_init=nn.with_logical_partitioning(_torch_linear_init, ("mlp", "embed")),
               bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)), **kw)(y)
  return constrain(y, ("batch", "length", "embed"))


class MMProjector(nn.Module):
  """mm_projector (vision -> LLM): (B, M, 3Dv) -> (B, M, D)."""
  llm_width: int
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    return _linear_gelu_linear(features, self.llm_width, self.llm_width, self.dtype,
                               self.param_dtype)


class AuxProjector(nn.Module):
  """aux_projector (LLM -> vision): (B, T, D) -> (B, T, Dv); maps instruction embeddings into
  the tower's width for text-guided encoding."""
  vision_width: int
  dtype: jnp.dtype = jnp.bfloat16
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _linear_gelu_linear(x, self.vision_width, self.vision_width, self.dtype,
                               self.param_dtype)
