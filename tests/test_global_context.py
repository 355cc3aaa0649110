"""global_context vs PyTorch: adaptive max pool bins, unfold windows, mosaic order, resize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_jax.models import global_context as gc

OUT_SIZES = tuple(range(2, 37))


def _torch_pool(x: np.ndarray, out) -> np.ndarray:
  t = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)
  return F.adaptive_max_pool2d(t, out).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def rng():
  return np.random.default_rng(0)


@pytest.mark.parametrize("n", [54, 48])
def test_adaptive_max_pool_matches_torch_all_sizes(rng, n):
  x = rng.standard_normal((2, n, n, 3)).astype(np.float32)
  # One compile for all 35 output sizes.
  pool_all = jax.jit(lambda x: [gc.adaptive_max_pool2d(x, (o, o)) for o in OUT_SIZES])
  outs = pool_all(x)
  for o, got in zip(OUT_SIZES, outs):
    np.testing.assert_array_equal(np.asarray(got), _torch_pool(x, o), err_msg=f"{n}->{o}")


def test_adaptive_max_pool_non_square_and_bf16(rng):
  x = rng.standard_normal((1, 54, 48, 4)).astype(np.float32)
  got = gc.adaptive_max_pool2d(jnp.asarray(x), (7, 5))
  np.testing.assert_array_equal(np.asarray(got), _torch_pool(x, (7, 5)))
  xb = jnp.asarray(x, jnp.bfloat16)
  gotb = gc.adaptive_max_pool2d(xb, (7, 5))
  assert gotb.dtype == jnp.bfloat16
  want = _torch_pool(np.asarray(xb.astype(jnp.float32)), (7, 5))
  np.testing.assert_array_equal(np.asarray(gotb.astype(jnp.float32)), want)


def test_adaptive_bins_are_torch_bins():
  idx = gc.adaptive_bins(54, 4)
  # torch: [0,14), [13,27), [27,41), [40,54) -> widths 14, 14, 14, 14
  assert idx[:, 0].tolist() == [0, 13, 27, 40]
  assert idx.max(axis=1).tolist() == [13, 26, 40, 53]
  idx = gc.adaptive_bins(5, 3)  # [0,2), [1,4), [3,5): uneven and overlapping
  assert idx.tolist() == [[0, 1, 1], [1, 2, 3], [3, 4, 4]]


def test_mosaic_order_hand_built():
  s, d = 2, 1
  tiles = np.zeros((1, 4, s * s, d), np.float32)
  for t in range(4):  # tile t, token r*s+c -> value 100*t + 10*r + c
    for r in range(s):
      for c in range(s):
        tiles[0, t, r * s + c, 0] = 100 * t + 10 * r + c
  got = np.asarray(gc.mosaic(jnp.asarray(tiles)))[0, :, :, 0]
  want = np.array([[0, 1, 100, 101],
                   [10, 11, 110, 111],
                   [200, 201, 300, 301],
                   [210, 211, 310, 311]], np.float32)
  np.testing.assert_array_equal(got, want)


def test_latent_init_and_windows_match_torch(rng):
  b, g, d, w = 2, 54, 5, 3
  grid = rng.standard_normal((b, g, g, d)).astype(np.float32)
  qs = (4, 16, 36, 64, 144)
  fn = jax.jit(lambda x: [(gc.latent_init(x, q), gc.context_windows(x, q, w)) for q in qs])
  tg = torch.from_numpy(grid).permute(0, 3, 1, 2)
  for q, (lat, win) in zip(qs, fn(grid)):
    r = int(np.sqrt(q))
    want_lat = F.adaptive_max_pool2d(tg, r).flatten(2).transpose(1, 2).numpy()
    np.testing.assert_array_equal(np.asarray(lat), want_lat, err_msg=f"latent q={q}")
    pooled = F.adaptive_max_pool2d(tg, w * r)
    unf = F.unfold(pooled, kernel_size=w, stride=w)  # (B, D*w*w, q)
    want_win = unf.reshape(b, d, w * w, q).permute(0, 3, 2, 1).numpy()
    assert win.shape == (b, q, w * w, d)
    np.testing.assert_array_equal(np.asarray(win), want_win, err_msg=f"windows q={q}")


def test_non_square_q_raises():
  x = jnp.zeros((1, 6, 6, 2))
  with pytest.raises(ValueError, match="perfect square"):
    gc.latent_init(x, 8)
  with pytest.raises(ValueError, match="perfect square"):
    gc.context_windows(x, 0)


@pytest.mark.parametrize("side,grid", [(24, 12), (27, 12), (12, 20)])
def test_resize_image_tokens_matches_torch_bilinear(rng, side, grid):
  b, d = 2, 6
  x = rng.standard_normal((b, side * side, d)).astype(np.float32)
  got = np.asarray(gc.resize_image_tokens(jnp.asarray(x), grid))
  t = torch.from_numpy(x).reshape(b, side, side, d).permute(0, 3, 1, 2)
  want = F.interpolate(t, size=(grid, grid), mode="bilinear", align_corners=False)
  want = want.permute(0, 2, 3, 1).reshape(b, grid * grid, d).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
