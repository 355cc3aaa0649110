"""Text-Guided Unified Vision Encoding (docs/model.md §4) vs a float64 numpy reference whose
attention rule is written pair by pair from the spec, plus hand checks of each rule."""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.models.text_guided import MODES, text_guided_encode, text_guided_layer_masks
from fusion_jax.models.vision import VisionConfig, VisionTower

CFG = VisionConfig(image_size=16, patch_size=8, hidden_size=32, intermediate_size=48,
                   num_layers=4, num_heads=4, dtype="float32")  # N = 4, k = 2 early layers
N, K = CFG.num_patches, CFG.num_layers // 2
B, T = 3, 3
# Example 0: one padded text token; 1: no valid text; 2: all valid.
TEXT_MASK = np.array([[True, True, False], [False, False, False], [True, True, True]])

TOWER = VisionTower(CFG)


@functools.partial(jax.jit, static_argnames="mode")
def guided(params, pixels, text, text_mask, mode):
  def run(tower):
    return text_guided_encode(tower, tower.embed(pixels), text, text_mask, mode)
  return nn.apply(run, TOWER)({"params": params})


@jax.jit
def plain(params, pixels):
  return TOWER.apply({"params": params}, pixels)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  pixels = jnp.asarray(rng.standard_normal((B, 16, 16, 3)), jnp.float32)
  params = nn.unbox(TOWER.init(jax.random.key(0), pixels)["params"])
  # Perturb everything so biases and LayerNorms are not the trivial init.
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [
      np.asarray(x) + 0.1 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves])
  text = rng.standard_normal((B, T, CFG.hidden_size)).astype(np.float32)
  return dict(params=params, pixels=pixels, text=text)


def _run(data, mode, text=None):
  text = data["text"] if text is None else text
  hs = guided(data["params"], data["pixels"], jnp.asarray(text), jnp.asarray(TEXT_MASK), mode)
  return [np.asarray(h) for h in hs]


# ---------------------------------------------------------------- float64 numpy reference
def _ln(x, p, eps=1e-6):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _may_attend(mode, early, valid, i, j):
  """docs/model.md §4, one (query i, key j) pair over [N patches, T text]: padded text keys never;
  in early layers of block mode, vision queries see no text."""
  key_ok = j < N or valid[j - N]
  if early and mode == "block_vision_to_text" and i < N:
    return j < N
  return key_ok


def _uniform_row(mode, early, i):
  """Faithful early layers: every text query row (padding included) is uniform over all keys."""
  return mode == "faithful" and early and i >= N


def _ref_layer(p, x, mode, early, valid):
  """x: (M, Dv) float64 for one example."""
  m, dv = x.shape
  h, hd = CFG.num_heads, CFG.head_dim
  a = p["self_attn"]
  y = _ln(x, p["layer_norm1"])
  proj = {n: y @ a[n]["kernel"].reshape(dv, dv) + a[n]["bias"].reshape(dv)
          for n in ("q_proj", "k_proj", "v_proj")}
  q, k, v = (proj[n].reshape(m, h, hd) for n in ("q_proj", "k_proj", "v_proj"))
  out = np.zeros((m, h, hd))
  for head in range(h):
    for i in range(m):
      if _uniform_row(mode, early, i):
        probs = np.full(m, 1.0 / m)
      else:
        s = np.array([q[i, head] @ k[j, head] / math.sqrt(hd)
                      if _may_attend(mode, early, valid, i, j) else -np.inf for j in range(m)])
        probs = np.exp(s - s.max())
        probs /= probs.sum()
      out[i, head] = probs @ v[:, head]
  x = x + out.reshape(m, dv) @ a["out_proj"]["kernel"].reshape(dv, dv) + a["out_proj"]["bias"]
  mlp = p["mlp"]
  y = _ln(x, p["layer_norm2"])
  y = _gelu_tanh(y @ mlp["fc1"]["kernel"] + mlp["fc1"]["bias"]) @ mlp["fc2"]["kernel"] + mlp["fc2"]["bias"]
  return x + y


def _reference(params, hs0, mode):
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  out = []
  for b in range(B):
    x = np.asarray(hs0[b], np.float64)
    hs = [x]
    for i in range(CFG.num_layers):
      x = _ref_layer(params[f"layers_{i}"], x, mode, i < K, TEXT_MASK[b])
      hs.append(x)
    out.append(hs)
  return [np.stack([out[b][i] for b in range(B)]) for i in range(CFG.num_layers + 1)]


# ---------------------------------------------------------------- tests
@pytest.mark.parametrize("mode", MODES)
def test_matches_reference(data, mode):
  hs = _run(data, mode)
  assert len(hs) == CFG.num_layers + 1 and hs[0].shape == (B, N + T, CFG.hidden_size)
  # hs0: patch embeddings (with positions) then the raw text states (no position embedding).
  np.testing.assert_array_equal(hs[0][:, N:], data["text"])
  want = _reference(data["params"], hs[0], mode)
  for i, (got, ref) in enumerate(zip(hs, want)):
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0, err_msg=f"{mode} hs[{i}]")


@pytest.mark.parametrize("mode", MODES)
def test_no_valid_text_equals_plain_tower(data, mode):
  ref = [np.asarray(h) for h in plain(data["params"], data["pixels"])]
  hs = _run(data, mode)
  # Example 1 has no valid instruction token: padded keys get probability exactly 0, so only
  # float32 rounding differs (the two programs reduce over N+T vs N keys).
  for i in range(CFG.num_layers + 1):
    np.testing.assert_allclose(hs[i][1, :N], ref[i][1], atol=1e-5, rtol=1e-5, err_msg=f"hs[{i}]")


def test_no_text_is_plain_tower(data):
  ref = plain(data["params"], data["pixels"])

  @jax.jit
  def no_text(params, pixels):
    return nn.apply(lambda t: text_guided_encode(t, t.embed(pixels), None), TOWER)({"params": params})

  for a, b in zip(no_text(data["params"], data["pixels"]), ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_faithful_text_rows_are_uniform_mean_in_early_layer(data):
  """Layer 0, faithful: each text row's attention output is the plain mean of the values of
  ALL N+T tokens (padding included), whatever the scores."""
  hs = _run(data, "faithful")
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), data["params"]["layers_0"])
  dv = CFG.hidden_size
  x = hs[0].astype(np.float64)
  v = _ln(x, p["layer_norm1"]) @ p["self_attn"]["v_proj"]["kernel"].reshape(dv, dv) \
      + p["self_attn"]["v_proj"]["bias"].reshape(dv)
  attn = v.mean(axis=1, keepdims=True)  # (B, 1, Dv): the same for every text row
  h = x[:, N:] + attn @ p["self_attn"]["out_proj"]["kernel"].reshape(dv, dv) + p["self_attn"]["out_proj"]["bias"]
  y = _ln(h, p["layer_norm2"])
  y = _gelu_tanh(y @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]) @ p["mlp"]["fc2"]["kernel"] \
      + p["mlp"]["fc2"]["bias"]
  np.testing.assert_allclose(hs[1][:, N:], h + y, atol=1e-4, rtol=0)


def _changed(data, which):
  """Text states with the valid (or padded) tokens' content replaced."""
  rng = np.random.default_rng(1)
  text = data["text"].copy()
  sel = TEXT_MASK if which == "valid" else ~TEXT_MASK
  text[sel] = rng.standard_normal((int(sel.sum()), CFG.hidden_size))
  return text


def test_block_mode_vision_ignores_text_in_early_layers(data):
  base = _run(data, "block_vision_to_text")
  other = _run(data, "block_vision_to_text", _changed(data, "valid"))
  for i in range(1, K + 1):  # outputs of the early layers 0..K-1
    np.testing.assert_array_equal(other[i][:, :N], base[i][:, :N], err_msg=f"hs[{i}]")
  # Late layers are bidirectional: vision now sees the (changed) valid text.
  late = np.abs(other[K + 1][:, :N] - base[K + 1][:, :N]).max(axis=(1, 2))
  assert late[0] > 1e-3 and late[2] > 1e-3 and late[1] == 0.0


def test_faithful_vision_sees_valid_text_in_early_layers(data):
  base = _run(data, "faithful")
  other = _run(data, "faithful", _changed(data, "valid"))
  diff = np.abs(other[1][:, :N] - base[1][:, :N]).max(axis=(1, 2))
  assert diff[0] > 1e-3 and diff[2] > 1e-3 and diff[1] == 0.0


@pytest.mark.parametrize("mode", MODES)
def test_padded_text_content(data, mode):
  base = _run(data, mode)
  other = _run(data, mode, _changed(data, "padded"))
  rows = np.concatenate([np.ones((B, N), bool), TEXT_MASK], axis=1)  # non-padded rows
  if mode == "block_vision_to_text":
    # Padded keys are masked everywhere: padding never reaches a real token.
    for i in range(CFG.num_layers + 1):
      np.testing.assert_array_equal(other[i][rows], base[i][rows], err_msg=f"hs[{i}]")
  else:
    # Faithful quirk: valid text rows average over padded values in early layers ...
    assert np.abs(other[1][0, N:N + 2] - base[1][0, N:N + 2]).max() > 1e-3
    # ... while vision rows mask padded keys (unchanged until text feeds back in layer 1).
    np.testing.assert_array_equal(other[1][:, :N], base[1][:, :N])


def test_layer_masks_shapes_and_errors():
  m = N + T
  masks = text_guided_layer_masks(N, jnp.asarray(TEXT_MASK), CFG.num_layers, "faithful")
  mask, uniform = masks(0)
  assert mask.shape == (B, 1, 1, m) and uniform.shape == (B, m)
  np.testing.assert_array_equal(np.asarray(uniform), np.tile(np.arange(m) >= N, (B, 1)))
  assert masks(K)[1] is None
  block = text_guided_layer_masks(N, jnp.asarray(TEXT_MASK), CFG.num_layers, "block_vision_to_text")
  early, late = block(K - 1)[0], block(K)[0]
  assert early.shape == (B, 1, m, m) and block(0)[1] is None
  np.testing.assert_array_equal(np.asarray(early[0, 0, :N, N:]), False)  # vision -/-> text
  np.testing.assert_array_equal(np.asarray(early[0, 0, N:, N:]), np.tile(TEXT_MASK[0], (T, 1)))
  np.testing.assert_array_equal(np.asarray(late[:, 0, 0]),
                                np.concatenate([np.ones((B, N), bool), TEXT_MASK], 1))
  with pytest.raises(ValueError, match="unknown vision_text_mask"):
    text_guided_layer_masks(N, jnp.asarray(TEXT_MASK), CFG.num_layers, "causal")
