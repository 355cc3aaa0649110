"""The assembled FUSION model on the tiny preset: forward, loss, shape stability, sharding."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.models import fusion
from fusion_jax.models.presets import TINY
from fusion_jax.parallel import sharding

B, S, LQ = 4, 48, 2


def _batch(q, seed=0):
  return fusion.example_batch(TINY, batch_size=B, seq_len=S, max_questions=LQ, q=q, seed=seed)


@pytest.fixture(scope="module")
def params():
  variables = fusion.init(jax.random.key(0), TINY, _batch(4))
  return nn.meta.unbox(variables["params"])


def test_param_tree(params):
  assert set(params) == {"llm", "vision_tower", "mm_projector", "aux_projector",
                         "interaction_0", "interaction_1"}
  assert len([k for k in params["vision_tower"] if k.startswith("layers_")]) == TINY.vision.num_layers


def test_forward_and_loss(params):
  batch = _batch(4)
  logits, aux = fusion.apply(params, batch, TINY, q=4)
  assert logits.shape == (B, S, TINY.llm.vocab_size) and logits.dtype == jnp.float32
  assert aux["patch_embeds"].shape == (B, 1, TINY.vision.num_patches, TINY.vision.hidden_size)
  assert aux["instruct_feats"].shape == (B, 1, TINY.max_instruct_len, TINY.llm.hidden_size)
  loss, parts = fusion.loss_fn(params, batch, TINY)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, parts["ce"] + 0.1 * (parts["text_map"] + parts["vision_map"]),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="implies q=4"):
    fusion.apply(params, batch, TINY, q=16)


def test_grads_reach_every_module(params):
  batch = _batch(4)
  grads = jax.jit(jax.grad(lambda p: fusion.loss_fn(p, batch, TINY)[0]))(params)  # one compile
  for name, g in grads.items():
    norm = float(jnp.sqrt(sum(jnp.sum(x * x) for x in jax.tree.leaves(g))))
    assert np.isfinite(norm) and norm > 0, name


def test_interaction_changes_only_through_latents(params):
  """Interaction layers off == a model whose latent slots are never updated."""
  batch = _batch(4)
  off = dataclasses.replace(TINY, interaction=False)
  p_off = {k: v for k, v in params.items() if not k.startswith("interaction_")}
  l_on, _ = fusion.apply(params, batch, TINY)
  l_off, _ = fusion.apply(p_off, batch, off)
  assert not np.allclose(l_on, l_off)
  # No latent slot in the batch -> interaction layers have nothing to update.
  empty = dict(batch, latent_pos=np.full_like(batch["latent_pos"], -1))
  np.testing.assert_allclose(fusion.apply(params, empty, TINY)[0],
                             fusion.apply(p_off, empty, off)[0], atol=1e-6)


def test_text_only_latents_are_zero_and_images_ignored(params):
  batch = _batch(4)
  i = 1  # odd samples are text-only
  assert not batch["has_image"][i, 0]
  noisy = dict(batch, images=batch["images"].copy())
  noisy["images"][i] = 255
  a, _ = fusion.apply(params, batch, TINY)
  b, _ = fusion.apply(params, noisy, TINY)
  np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b[i]))


def test_two_q_values_compile_twice(params):
  traces = []

  @jax.jit
  def f(p, batch):
    traces.append(batch["latent_pos"].shape)
    return fusion.loss_fn(p, batch, TINY)[0]

  for q in (1, 4, 1, 4, 4):
    f(params, _batch(q, seed=q))
  assert len(traces) == 2


def test_sharded_equals_unsharded(params):
  batch = _batch(4)
  ref, _ = jax.jit(lambda p, b: fusion.loss_fn(p, b, TINY))(params, batch)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  abstract = jax.eval_shape(lambda: fusion.init(jax.random.key(0), TINY, _batch(4)))
  pshard = sharding.param_shardings(abstract, mesh, rules)["params"]
  bshard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    p = jax.device_put(params, pshard)
    bt = jax.device_put(batch, bshard)
    out, _ = jax.jit(lambda p, b: fusion.loss_fn(p, b, TINY))(p, bt)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  spec = p["llm"]["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec
  assert tuple(spec) == ("fsdp", "tensor")


def test_latents_off_hides_latent_slots(params):
  """latents=False: logits do not depend on what sits in the latent slots."""
  batch = _batch(4)
  off = dataclasses.replace(TINY, latents=False)
  a, _ = fusion.apply(params, batch, off)
  ids = batch["input_ids"].copy()
  for i in range(B):
    lp = batch["latent_pos"][i, 0][batch["latent_pos"][i, 0] >= 0]
    ids[i, lp] = 7
  b, _ = fusion.apply(params, dict(batch, input_ids=ids), off)
  keep = batch["token_mask"].copy()
  for i in range(B):
    keep[i, batch["latent_pos"][i, 0][batch["latent_pos"][i, 0] >= 0]] = False
  np.testing.assert_allclose(np.asarray(a)[keep], np.asarray(b)[keep], atol=1e-5)


def test_fusion_l_resizes_image_tokens_at_inference(params):
  """FUSION-L: the image slot holds grid^2 resized tokens; training with it is refused."""
  lcfg = dataclasses.replace(TINY, fusion_l_grid=2)
  assert lcfg.num_image_tokens == 4
  batch = fusion.example_batch(lcfg, batch_size=B, seq_len=S, max_questions=LQ, q=4)
  logits, _ = fusion.apply(params, batch, lcfg, train=False)
  assert logits.shape == (B, S, TINY.llm.vocab_size) and np.isfinite(logits).all()
  with pytest.raises(ValueError, match="inference option"):
    fusion.apply(params, batch, lcfg, train=True)
