"""Scanned layers (decoder groups with interaction layers inside, scanned tower) compute what the
unrolled model computes, and every layout boundary (torch import/export, init_from, KV cache)
converts correctly."""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.convert import fusion_torch
from fusion_jax.convert.model_dir import save_model_dir
from fusion_jax.models import fusion, llm, param_layout
from fusion_jax.models.presets import TINY
from fusion_jax.train.init_from import restore_params

# 4 decoder layers, interaction after layers 0 and 2: head (1 layer + block), one group
# (2 layers + block), tail (1 layer). 4 tower layers: connector k = 2.
UNROLLED = TINY.replace(llm=TINY.llm.replace(num_layers=4),
                        vision=dataclasses.replace(TINY.vision, num_layers=4))
# Named remat policies inside the scans (they change memory, never values).
SCANNED = UNROLLED.replace(
    llm=UNROLLED.llm.replace(scan_layers=True, remat_policy="save_qkv_proj"),
    vision=dataclasses.replace(UNROLLED.vision, scan_layers=True, remat_policy="full"))


def _batch():
  return fusion.example_batch(UNROLLED, batch_size=2, seq_len=48, max_questions=2, q=4, seed=1)


@pytest.fixture(scope="module")
def params():
  p = fusion_torch.abstract_params(UNROLLED)
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda x: (0.1 * rng.standard_normal(x.shape)).astype(np.float32), p)


def test_layer_plan():
  assert llm.layer_plan(32, tuple(range(0, 30, 3))) == llm.LayerPlan(1, 3, 9, 4)
  assert llm.layer_plan(4, ()) == llm.LayerPlan(0, 1, 0, 4)
  assert llm.layer_plan(6, (2,)) == llm.LayerPlan(3, 1, 0, 3)
  with pytest.raises(ValueError, match="evenly spaced"):
    llm.layer_plan(8, (0, 2, 3))


def test_layout_matches_init_and_round_trips(params):
  scanned = param_layout.to_config_layout(params, SCANNED)
  init = fusion_torch.abstract_params(SCANNED)
  shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
  assert shapes(scanned) == shapes(init)
  assert scanned["llm"]["groups"]["layers"]["mlp"]["up_proj"]["kernel"].shape[:2] == (1, 2)
  assert "interaction_0" not in scanned and "layers" in scanned["vision_tower"]
  back = param_layout.to_config_layout(scanned, UNROLLED)
  assert jax.tree.all(jax.tree.map(np.array_equal, params, back))
  assert param_layout.to_config_layout(params, UNROLLED) == params  # no-op on a match


def test_scanned_forward_and_grads_match_unrolled(params):
  batch = _batch()
  scanned = param_layout.to_config_layout(params, SCANNED)
  # Jitted: one compile per layout is about a third of the time of running them op by op.
  (l0, parts0), g0 = jax.jit(jax.value_and_grad(
      lambda p: fusion.loss_fn(p, batch, UNROLLED), has_aux=True))(params)
  (l1, parts1), g1 = jax.jit(jax.value_and_grad(
      lambda p: fusion.loss_fn(p, batch, SCANNED), has_aux=True))(scanned)
  np.testing.assert_allclose(l0, l1, rtol=1e-5, atol=1e-6)
  for k in parts0:
    np.testing.assert_allclose(parts0[k], parts1[k], rtol=1e-5, atol=1e-6, err_msg=k)
  g1 = param_layout.to_unscanned(g1, SCANNED)
  for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(g0),
                               jax.tree_util.tree_leaves_with_path(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Every interaction layer really runs: its gradient is not zero.
  assert float(jnp.abs(g0["interaction_1"]["proj_in"]["kernel"]).sum()) > 0


def test_scanned_kv_cache_generation_matches(params):
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  logits = []
  for cfg, p in ((UNROLLED, params), (SCANNED, param_layout.to_config_layout(params, SCANNED))):
    cache = llm.init_cache(cfg.llm, 2, 56)
    first, cache = jax.jit(lambda p, b, c, cfg=cfg: fusion.prefill(p, b, cfg, c))(p, batch, cache)
    nxt = jnp.argmax(first[jnp.arange(2), batch["token_mask"].sum(1) - 1], -1)[:, None]
    pos = batch["positions"].max(1, keepdims=True) + 1
    second, cache = jax.jit(lambda p, i, x, c, cfg=cfg: fusion.decode(p, i, x, cfg, c))(
        p, nxt.astype(jnp.int32), pos, cache)
    logits.append((first, second))
  for a, b in zip(*logits):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-5)


def test_imported_weights_same_logits_in_both_layouts(params):
  """torch tensors -> fusion_params_from_reader for each layout -> identical logits."""
  tensors = dict(fusion_torch.fusion_tensors_to_torch(param_layout.to_config_layout(
      params, SCANNED), SCANNED))  # export reads the scanned tree as well

  class Reader:
    def keys(self):
      return list(tensors)

    def __contains__(self, k):
      return k in tensors

    def shape(self, k):
      return tuple(tensors[k].shape)

    def get(self, k):
      return tensors[k]

  batch = _batch()
  out = [jax.jit(lambda p, b, cfg=cfg: fusion.apply(p, b, cfg)[0])(
      fusion_torch.fusion_params_from_reader(Reader(), cfg), batch) for cfg in (UNROLLED, SCANNED)]
  np.testing.assert_allclose(out[0], out[1], rtol=1e-5, atol=2e-5)


def test_init_from_unrolled_model_dir_into_scanned_run(tmp_path, params):
  md = str(tmp_path / "model")
  save_model_dir(md, params, UNROLLED)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=cpu),
                        fusion_torch.abstract_params(SCANNED))
  got, report = restore_params(
      md, target, adapt=lambda t: param_layout.to_config_layout(t, SCANNED))
  assert not report["fresh"] and not report["unused"]
  want = param_layout.to_config_layout(params, SCANNED)
  assert jax.tree.all(jax.tree.map(np.array_equal, want, jax.device_get(got)))
