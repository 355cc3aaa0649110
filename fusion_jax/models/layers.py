"""Linear layers whose kernels carry logical axis names on their true (unflattened) shape.

flax.linen.DenseGeneral calls its kernel_init on a flattened 2-D shape and reshapes after, so
a 3-name logical partitioning such as ('embed', 'heads', 'head_dim') is applied to a rank-2
value: under `jax.set_mesh` the parameter shape check (which re-runs the initializer) then
fails. MaxText avoids this with its own DenseGeneral; so do we.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Initializer = Callable[..., jax.Array]


def _normalize_axes(axes: Sequence[int], ndim: int) -> tuple[int, ...]:
  return tuple(a % ndim for a in axes)


class DenseGeneral(nn.Module):
  """y = x . kernel (+ bias) contracting `axis` of x; kernel shape = contracted dims + features.

  Attributes:
    features: output feature dims, e.g. (heads, head_dim) or D.
    kernel_axes: logical names of the kernel (contracted dims first, then features).
    axis: contracted input axes (default the last).
    use_bias, bias_axes: optional bias over `features` with its logical names.
    kernel_init: initializer called with the FULL kernel shape; `fan_in_axes` tells variance
      scaling initializers which dims are inputs.
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  axis: int | tuple[int, ...] = -1
  use_bias: bool = False
  bias_axes: tuple[str | None, ...] = ()
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = _normalize_axes(axis, x.ndim)
    in_dims = tuple(x.shape[a] for a in axis)
    shape = in_dims + features
    if len(self.kernel_axes) != len(shape):
      raise ValueError(f"{self.name}: kernel_axes {self.kernel_axes} do not match kernel shape {shape}")

    def init(rng, shape, dtype):
      # Initialise as the flat (fan_in, fan_out) matrix so variance scaling sees the right fans.
      flat = (int(np.prod(in_dims)), int(np.prod(features)))
      return jnp.reshape(self.kernel_init(rng, flat, dtype), shape)

    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes), shape,
                        self.param_dtype)
    x = x.astype(self.dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    n = len(axis)
    y = jax.lax.dot_general(x, kernel, ((axis, tuple(range(n))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(self.bias_init, self.bias_axes),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y
