"""InteractionLayer + apply_interaction vs a torch reference written from docs/model.md §7,
loaded through the interaction key table (strict load_state_dict)."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from fusion_jax.convert.fusion_keys import (interaction_params_from_torch,
                                            interaction_tensors_to_torch, interaction_torch_keys)
from fusion_jax.models.interaction import InteractionLayer, apply_interaction

D, HEADS, W = 32, 4, 3
B, S, LQ = 2, 40, 3


# ------------------------------------------------------ torch reference (docs/model.md §7)
class TorchCrossAttn(tnn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.q_proj = tnn.Sequential(tnn.LayerNorm(d, eps=1e-5), tnn.Linear(d, d, bias=False))
    self.k_proj = tnn.Sequential(tnn.LayerNorm(d, eps=1e-5), tnn.Linear(d, d, bias=False))
    self.v_proj = tnn.Sequential(tnn.LayerNorm(d, eps=1e-5), tnn.Linear(d, d, bias=False))
    self.o_proj = tnn.Linear(d, d, bias=False)

  def forward(self, z, c):  # z (D,), c (K, D)
    hd = z.shape[-1] // self.heads
    q = self.q_proj(z).reshape(self.heads, 1, hd)
    k = self.k_proj(c).reshape(-1, self.heads, hd).transpose(0, 1)
    v = self.v_proj(c).reshape(-1, self.heads, hd).transpose(0, 1)
    p = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), dim=-1)
    return self.o_proj((p @ v).reshape(-1))


class TorchProjOut(tnn.Module):
  def __init__(self, d):
    super().__init__()
    self.linear_1 = tnn.Linear(d, d, bias=False)
    self.act = tnn.GELU()
    self.linear_2 = tnn.Linear(d, d, bias=False)

  def forward(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


class TorchInteraction(tnn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.proj_in = tnn.Linear(2 * d, d, bias=False)
    self.proj_context = tnn.Linear(d, d, bias=False)
    self.cross_attn = TorchCrossAttn(d, heads)
    self.norm = tnn.LayerNorm(d, eps=1e-5)
    self.proj_out = TorchProjOut(d)

  def forward(self, p, x, window):
    z = self.proj_in(torch.cat([p, x], -1))
    a = self.cross_attn(z, self.proj_context(window))
    return self.proj_out(self.norm(a + z)) + x


class Sampler(tnn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.layers = tnn.ModuleList([TorchInteraction(d, heads)])


class Root(tnn.Module):  # key path model.vision_sampler_layers.{j}.layers.0.*
  def __init__(self, d, heads, n):
    super().__init__()
    self.model = tnn.Module()
    self.model.vision_sampler_layers = tnn.ModuleList([Sampler(d, heads) for _ in range(n)])


def torch_apply(layer, h, question_pos, latent_pos, windows):
  """Per-slot loop straight from the spec: slot v = l*q + kk uses question l and window kk."""
  h = h.clone()
  src = h.clone()
  lq, q = question_pos.shape[1], windows.shape[1]
  for b in range(h.shape[0]):
    for l in range(lq):
      for kk in range(q):
        qp, lp = int(question_pos[b, l]), int(latent_pos[b, l * q + kk])
        if qp < 0 or lp < 0:
          continue
        h[b, lp] = layer(src[b, qp], src[b, lp], windows[b, kk])
  return h


# ---------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def params():
  layer = InteractionLayer(num_heads=HEADS, dtype=jnp.float32)
  variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 1, D)), jnp.zeros((1, 1, 4, D)),
                         jnp.zeros((1, 4, W * W, D)))
  params = nn.meta.unbox(variables["params"])
  # Non-trivial LayerNorm affine so a scale/bias mix-up would show.
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x + 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(path))), x.shape)
      if "norm" in str(path) else x, params)


@jax.jit
def jax_apply(params, h, question_pos, latent_pos, windows):
  layer = InteractionLayer(num_heads=HEADS, dtype=jnp.float32).bind({"params": params})
  return apply_interaction(layer, h, question_pos, latent_pos, windows)


def make_inputs(q, seed):
  rng = np.random.default_rng(seed)
  h = rng.standard_normal((B, S, D)).astype(np.float32)
  windows = rng.standard_normal((B, q, W * W, D)).astype(np.float32)
  question_pos = np.full((B, LQ), -1, np.int32)
  latent_pos = np.full((B, LQ * q), -1, np.int32)
  # sample 0: 2 questions, the second truncated after 1 latent; sample 1: 1 question.
  nq = (2, 1)
  for b in range(B):
    perm = rng.permutation(S)
    question_pos[b, :nq[b]] = perm[:nq[b]]
    n_lat = nq[b] * q
    latent_pos[b, :n_lat] = perm[nq[b]:nq[b] + n_lat]
  latent_pos[0, q + 1:2 * q] = -1  # truncated latents of question 1
  latent_pos[1, 2] = -1  # a hole
  latent_pos[1, q] = 7  # a valid-looking latent of the padded question 1
  return h, question_pos, latent_pos, windows


def test_key_table_names_and_shapes(params):
  tensors = dict(interaction_tensors_to_torch(params, 3))
  assert list(tensors) == interaction_torch_keys(3)
  pre = "model.vision_sampler_layers.3.layers.0."
  assert tensors[pre + "proj_in.weight"].shape == (D, 2 * D)
  assert tensors[pre + "cross_attn.k_proj.0.bias"].shape == (D,)
  assert tensors[pre + "cross_attn.k_proj.1.weight"].shape == (D, D)
  assert len(tensors) == 16


def test_round_trip_exact(params):
  tensors = dict(interaction_tensors_to_torch(params, 1))
  back = interaction_params_from_torch(tensors.__getitem__, 1)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_shape_errors_are_clear(params):
  tensors = dict(interaction_tensors_to_torch(params, 0))
  key = "model.vision_sampler_layers.0.layers.0.proj_out.linear_1.weight"
  tensors[key] = np.zeros((D, D + 1), np.float32)
  with pytest.raises(ValueError, match="proj_out.linear_1.weight"):
    interaction_params_from_torch(tensors.__getitem__, 0)
  with pytest.raises(KeyError, match="params lack proj_context"):
    list(interaction_tensors_to_torch({"cross_attn": {}}, 0))


@pytest.mark.parametrize("q", [4, 16])
def test_matches_torch_reference(params, q):
  ref = Root(D, HEADS, 1)
  state = {k: torch.from_numpy(np.array(v)) for k, v in interaction_tensors_to_torch(params, 0)}
  ref.load_state_dict(state, strict=True)
  layer_t = ref.model.vision_sampler_layers[0].layers[0]

  h, question_pos, latent_pos, windows = make_inputs(q, seed=q)
  got = np.asarray(jax_apply(params, h, question_pos, latent_pos, windows))
  with torch.no_grad():
    want = torch_apply(layer_t, torch.from_numpy(h), question_pos, latent_pos,
                       torch.from_numpy(windows)).numpy()
  assert np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)

  # Only valid latent slots (valid latent and valid question) change; the rest is bit-identical.
  valid = (latent_pos >= 0) & np.repeat(question_pos >= 0, q, axis=1)
  changed = np.zeros((B, S), bool)
  for b in range(B):
    changed[b, latent_pos[b][valid[b]]] = True
  assert changed.sum() > 0 and (~valid & (latent_pos >= 0)).any()
  np.testing.assert_array_equal(got[~changed], h[~changed])
  assert np.all(np.abs(got[changed] - h[changed]).max(axis=-1) > 0)


def test_compiles_once_per_q(params):
  traces = []

  @jax.jit
  def fresh(params, h, question_pos, latent_pos, windows):
    traces.append(latent_pos.shape)  # Python side effect: runs once per trace
    layer = InteractionLayer(num_heads=HEADS, dtype=jnp.float32).bind({"params": params})
    return apply_interaction(layer, h, question_pos, latent_pos, windows)

  for q in (4, 16, 4, 16, 4):
    fresh(params, *make_inputs(q, seed=100 + q))
  assert len(traces) == 2, traces
  assert fresh._cache_size() == 2


def test_gradients_finite_with_padding(params):
  h, question_pos, latent_pos, windows = make_inputs(4, seed=3)
  h[:, 0] = 0.0  # invalid gathers read position 0: make it all zeros (LayerNorm of zeros)

  def f(params, h):
    return jnp.sum(jax_apply(params, h, question_pos, latent_pos, windows) ** 2)

  gp, gh = jax.grad(f, argnums=(0, 1))(params, jnp.asarray(h))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(gp))
  assert np.all(np.isfinite(gh))


def test_window_count_mismatch_raises(params):
  h, question_pos, latent_pos, windows = make_inputs(4, seed=1)
  with pytest.raises(ValueError, match="q=4"):
    jax_apply(params, h, question_pos, latent_pos, windows[:, :3])


def test_runs_sharded_under_logical_rules(params):
  from fusion_jax.parallel.sharding import DEFAULT_RULES, make_mesh, param_shardings

  mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4})
  layer = InteractionLayer(num_heads=HEADS, dtype=jnp.float32)
  abstract = jax.eval_shape(layer.init, jax.random.PRNGKey(0), jnp.zeros((2, 1, D)),
                            jnp.zeros((2, 1, 4, D)), jnp.zeros((2, 4, W * W, D)))
  shardings = param_shardings(abstract, mesh)["params"]
  spec = shardings["cross_attn"]["q_proj"]["kernel"].spec
  assert tuple(spec) == ("fsdp", "tensor")
  h, question_pos, latent_pos, windows = make_inputs(4, seed=5)
  want = np.asarray(jax_apply(params, h, question_pos, latent_pos, windows))
  # A fresh jit: Flax logical rules are trace-time context that jit's cache does not key on.
  sharded_apply = jax.jit(lambda *a: apply_interaction(layer.bind({"params": a[0]}), *a[1:]))
  with jax.set_mesh(mesh), nn.logical_axis_rules(list(DEFAULT_RULES)):
    p = jax.device_put(params, shardings)
    hs = jax.device_put(h, jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"))))
    out = sharded_apply(p, hs, question_pos, latent_pos, windows)
    hlo = sharded_apply.lower(p, hs, question_pos, latent_pos, windows).as_text()
  assert "sharding_constraint" in hlo  # the logical activation constraints took effect
  got = np.asarray(out)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
