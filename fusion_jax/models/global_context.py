"""static_hd global context: the tile mosaic, PyTorch-exact adaptive max pooling, latent init
and the per-latent context windows (docs/model.md §5-6).

The four tile grids of an image (TL, TR, BL, BR), each sqrt(N) x sqrt(N) tokens of width D
after connector + mm_projector, form a 2x2 mosaic of (2 sqrt N)^2 tokens. Latent tokens start
as an adaptive max pool of that mosaic to sqrt(q) x sqrt(q); each latent kk then attends to the
kk-th w x w block of the mosaic pooled to (w sqrt q)^2.

Everything here is parameter-free and works on static shapes: pooling bins are computed in
numpy at trace time, so each (input size, output size) pair is one fixed gather + max.
Layout is channels-last (B, H, W, D) throughout.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.models import query_len as query_len_lib


def adaptive_bins(n: int, o: int) -> np.ndarray:
  """PyTorch adaptive-pool bins as a dense (o, k) index table over an axis of length n.

  Bin i covers [floor(i n / o), ceil((i+1) n / o)) -- possibly overlapping and uneven. Bins
  shorter than the longest k repeat their last index; max is idempotent, so the repeats do not
  change the result and every bin becomes a fixed-width window.
  """
  if n <= 0 or o <= 0:
    raise ValueError(f"adaptive pool: sizes must be positive, got input {n} -> output {o}")
  i = np.arange(o)
  starts = (i * n) // o
  ends = -((-(i + 1) * n) // o)  # ceil((i+1) n / o) in exact integer arithmetic
  k = int((ends - starts).max())
  idx = np.minimum(starts[:, None] + np.arange(k)[None, :], (ends - 1)[:, None])
  return idx.astype(np.int32)


def _max_pool_axis(x: jax.Array, axis: int, o: int) -> jax.Array:
  """Adaptive max pool of one axis of x to length o (PyTorch bins)."""
  n = x.shape[axis]
  if n % o == 0:
    # Disjoint equal bins: a reshape + max, no gather.
    shape = x.shape[:axis] + (o, n // o) + x.shape[axis + 1:]
    return jnp.max(x.reshape(shape), axis=axis + 1)
  idx = adaptive_bins(n, o)
  k = idx.shape[1]
  g = jnp.take(x, jnp.asarray(idx.reshape(-1)), axis=axis)
  g = g.reshape(x.shape[:axis] + (o, k) + x.shape[axis + 1:])
  return jnp.max(g, axis=axis + 1)


def adaptive_max_pool2d(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
  """torch.nn.functional.adaptive_max_pool2d on channels-last input, bit-exact.

  Max pooling is separable (the 2D bin is the product of the row bin and the column bin), so
  it runs as a pool over H followed by a pool over W.

  Args:
    x: (B, H, W, C), any float dtype.
    out_hw: (oh, ow) output grid.

  Returns:
    (B, oh, ow, C) in x's dtype.
  """
  if x.ndim != 4:
    raise ValueError(f"adaptive_max_pool2d: expected (B, H, W, C), got shape {x.shape}")
  oh, ow = int(out_hw[0]), int(out_hw[1])
  return _max_pool_axis(_max_pool_axis(x, 1, oh), 2, ow)


def mosaic(tile_tokens: jax.Array) -> jax.Array:
  """Assembles the 4 tile grids into the 2x2 global-context mosaic.

  Args:
    tile_tokens: (B, 4, N, D), tiles in order TL, TR, BL, BR; each tile's N = s*s tokens are a
      row-major s x s grid.

  Returns:
    (B, 2s, 2s, D): rows 0..s-1 are [TL | TR], rows s..2s-1 are [BL | BR].
  """
  b, t, n, d = tile_tokens.shape
  if t != 4:
    raise ValueError(f"mosaic: expected 4 tiles (TL, TR, BL, BR) on axis 1, got {t}")
  s = query_len_lib.side(n, "global_context: tile tokens N")
  x = tile_tokens.reshape(b, 2, 2, s, s, d)  # (B, tile_row, tile_col, r, c, D)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, tile_row, r, tile_col, c, D)
  return x.reshape(b, 2 * s, 2 * s, d)


def latent_init(mosaic_grid: jax.Array, q: int) -> jax.Array:
  """Initial latent tokens: the mosaic max-pooled to sqrt(q) x sqrt(q), row-major.

  Args:
    mosaic_grid: (B, G, G, D).
    q: latent tokens per question (perfect square).

  Returns:
    (B, q, D).
  """
  r = query_len_lib.side(q, "global_context: q")
  b, _, _, d = mosaic_grid.shape
  return adaptive_max_pool2d(mosaic_grid, (r, r)).reshape(b, q, d)


def context_windows(mosaic_grid: jax.Array, q: int, w: int = 3) -> jax.Array:
  """Per-latent context: the mosaic pooled to (w sqrt q)^2, cut into q blocks of w x w.

  Block kk is the kk-th w x w block in row-major block order (stride w), tokens inside a block
  row-major -- the order of torch.nn.functional.unfold(kernel_size=w, stride=w) on the pooled
  (B, D, H, W) grid reshaped to (B, D, w*w, q) and permuted to (B, q, w*w, D).

  Args:
    mosaic_grid: (B, G, G, D).
    q: latent tokens per question (perfect square).
    w: window size (3 in FUSION).

  Returns:
    (B, q, w*w, D).
  """
  r = query_len_lib.side(q, "global_context: q")
  if w <= 0:
    raise ValueError(f"context_windows: window size must be positive, got {w}")
  b, _, _, d = mosaic_grid.shape
  g = adaptive_max_pool2d(mosaic_grid, (w * r, w * r))
  g = g.reshape(b, r, w, r, w, d)  # (B, block_row, in_row, block_col, in_col, D)
  g = g.transpose(0, 1, 3, 2, 4, 5)  # (B, block_row, block_col, in_row, in_col, D)
  return g.reshape(b, q, w * w, d)


def bilinear_matrix(n: int, m: int) -> np.ndarray:
  """(m, n) interpolation matrix of torch bilinear resize, align_corners=False, no antialias.

  Follows ATen's area_pixel_compute_source_index: src = (dst + 0.5) * n / m - 0.5, clamped at
  0; the upper neighbour index is clamped to n - 1.
  """
  scale = n / m
  src = np.maximum((np.arange(m, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.floor(src).astype(np.int64)
  lo = np.minimum(lo, n - 1)
  hi = np.minimum(lo + 1, n - 1)
  frac = src - lo
  mat = np.zeros((m, n), np.float64)
  np.add.at(mat, (np.arange(m), lo), 1.0 - frac)
  np.add.at(mat, (np.arange(m), hi), frac)
  return mat.astype(np.float32)


def resize_image_tokens(tokens: jax.Array, grid: int) -> jax.Array:
  """Bilinear resize of a square token grid (the FUSION-L option).

  Matches torch F.interpolate(mode='bilinear', align_corners=False) (no antialias, which is
  torch's default and what the authors use; jax.image.resize would antialias when
  downsampling). Separable: one small (grid, s) matrix per axis.

  Args:
    tokens: (B, N, D), N = s*s row-major.
    grid: output side.

  Returns:
    (B, grid*grid, D) in tokens' dtype.
  """
  b, n, d = tokens.shape
  s = query_len_lib.side(n, "global_context: image tokens N")
  if grid <= 0:
    raise ValueError(f"resize_image_tokens: grid must be positive, got {grid}")
  if grid == s:
    return tokens
  mat = jnp.asarray(bilinear_matrix(s, grid))
  x = tokens.reshape(b, s, s, d).astype(jnp.float32)
  x = jnp.einsum("ih,bhwd->biwd", mat, x)
  x = jnp.einsum("jw,biwd->bijd", mat, x)
  return x.reshape(b, grid * grid, d).astype(tokens.dtype)
