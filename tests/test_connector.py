"""Feature connector (hand-checked k and mean ranges) and the two projectors vs torch
nn.Sequential(Linear, GELU(), Linear) with copied weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn as tnn

from fusion_jax.models.connector import AuxProjector, MMProjector, connector_k, feature_connector


@pytest.mark.parametrize("num_layers, k, first, second", [
    (26, 13, range(0, 13), range(13, 26)),   # SigLIP so400m: L' = 26
    (39, 19, range(0, 19), range(19, 38)),   # SigLIP2 giant-opt: L' = 39
    (3, 1, range(0, 1), range(1, 2)),
])
def test_feature_connector_ranges(num_layers, k, first, second):
  assert connector_k(num_layers) == k
  rng = np.random.default_rng(num_layers)
  hs = [rng.standard_normal((2, 5, 4)).astype(np.float32) for _ in range(num_layers + 1)]
  want = np.concatenate([
      hs[num_layers],
      np.mean(np.stack([hs[i] for i in first]), axis=0),
      np.mean(np.stack([hs[i] for i in second]), axis=0)], axis=-1)
  hs_j = [jnp.asarray(h) for h in hs]
  got = feature_connector(hs_j)
  assert got.shape == (2, 5, 12) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=0)
  # Explicit k gives the same; a k that overruns the hidden states is refused.
  np.testing.assert_array_equal(np.asarray(feature_connector(hs_j, k=k)), np.asarray(got))
  with pytest.raises(ValueError, match="2k-1"):
    feature_connector(hs_j, k=num_layers)


def test_feature_connector_keeps_bf16():
  hs = [jnp.full((1, 2, 3), i, jnp.bfloat16) for i in range(27)]
  out = feature_connector(hs)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out[0, 0], np.float32),
                                [26.0] * 3 + [6.0] * 3 + [19.0] * 3)


def _torch_mlp(d_in, d_hidden, d_out, seed):
  torch.manual_seed(seed)
  return tnn.Sequential(tnn.Linear(d_in, d_hidden), tnn.GELU(), tnn.Linear(d_hidden, d_out)).eval()


def _params_from_torch(seq):
  sd = {k: v.detach().numpy() for k, v in seq.state_dict().items()}
  return {"linear_0": {"kernel": sd["0.weight"].T, "bias": sd["0.bias"]},
          "linear_2": {"kernel": sd["2.weight"].T, "bias": sd["2.bias"]}}


@pytest.mark.parametrize("module, d_in, width", [
    (MMProjector(llm_width=40, dtype=jnp.float32), 3 * 24, 40),   # 3Dv -> D -> D
    (AuxProjector(vision_width=24, dtype=jnp.float32), 40, 24),   # D -> Dv -> Dv
])
def test_projector_matches_torch(module, d_in, width):
  seq = _torch_mlp(d_in, width, width, seed=width)
  x = np.random.default_rng(0).standard_normal((2, 7, d_in)).astype(np.float32) * 2
  with torch.no_grad():
    want = seq(torch.from_numpy(x)).numpy()
  variables = module.init(jax.random.key(0), jnp.asarray(x))
  shapes = jax.tree.map(np.shape, nn.unbox(variables)["params"])
  params = _params_from_torch(seq)
  assert shapes == jax.tree.map(np.shape, params)
  got = jax.jit(module.apply)({"params": params}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)
  # Logical axis names on every parameter.
  for path, leaf in jax.tree_util.tree_leaves_with_path(
      variables["params"], is_leaf=lambda v: isinstance(v, nn.Partitioned)):
    assert isinstance(leaf, nn.Partitioned), jax.tree_util.keystr(path)
    assert len(leaf.names) == leaf.value.ndim and all(leaf.names), jax.tree_util.keystr(path)
