"""Dual-Supervised Semantic Mapping loss vs torch cross_entropy and CosineEmbeddingLoss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_jax.models import mapping_loss as ml


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  b, s, v, t, d, n, dv = 3, 12, 50, 7, 16, 9, 8
  labels = rng.integers(0, v, (b, s)).astype(np.int32)
  labels[rng.random((b, s)) < 0.4] = -100
  labels[:, 0] = 5  # position 0 is never a target after the shift
  mask = rng.random((b, t)) < 0.7
  mask[2] = False  # a text-only sample: no valid instruction tokens
  out = dict(
      logits=rng.standard_normal((b, s, v)).astype(np.float32) * 3,
      labels=labels,
      embeds=rng.standard_normal((b, t, d)).astype(np.float32),
      feats=rng.standard_normal((b, t, d)).astype(np.float32),
      mask=mask,
      patches=rng.standard_normal((b, n, dv)).astype(np.float32),
      back=rng.standard_normal((b, n, dv)).astype(np.float32),
      has_image=np.array([True, True, False]),
  )
  out["back"][2] = 0.0  # zero vectors: exercises torch's 1e-12 epsilon (cos = 0)
  return out


def _torch_cos_loss(a, b):
  a, b = torch.from_numpy(np.array(a)), torch.from_numpy(np.array(b))
  return torch.nn.CosineEmbeddingLoss()(a, b, torch.ones(a.shape[0])).item()


def test_cross_entropy_matches_torch(data):
  s, c = ml.cross_entropy(jnp.asarray(data["logits"]), jnp.asarray(data["labels"]))
  v = data["logits"].shape[-1]
  want = F.cross_entropy(torch.from_numpy(data["logits"][:, :-1].reshape(-1, v)),
                         torch.from_numpy(data["labels"][:, 1:].reshape(-1)).long(),
                         ignore_index=-100).item()
  assert int(c) == int((data["labels"][:, 1:] != -100).sum())
  np.testing.assert_allclose(float(s / c), want, rtol=1e-6, atol=1e-6)


def test_cross_entropy_bf16_logits_upcast(data):
  lb = jnp.asarray(data["logits"], jnp.bfloat16)
  s, c = ml.cross_entropy(lb, jnp.asarray(data["labels"]))
  s32, _ = ml.cross_entropy(lb.astype(jnp.float32), jnp.asarray(data["labels"]))
  assert s.dtype == jnp.float32
  np.testing.assert_allclose(float(s), float(s32), rtol=1e-6)


def test_text_mapping_matches_torch(data):
  s, c = ml.text_mapping_loss(jnp.asarray(data["embeds"]), jnp.asarray(data["feats"]),
                              jnp.asarray(data["mask"]))
  m = data["mask"]
  want = _torch_cos_loss(data["embeds"][m], data["feats"][m])
  assert int(c) == int(m.sum())
  np.testing.assert_allclose(float(s / c), want, rtol=1e-6, atol=1e-6)


def test_vision_mapping_matches_torch(data):
  p, bk = data["patches"], data["back"]
  dv = p.shape[-1]
  s, c = ml.vision_mapping_loss(jnp.asarray(p), jnp.asarray(bk))
  want = _torch_cos_loss(p.reshape(-1, dv), bk.reshape(-1, dv))  # all B*N patches (faithful)
  assert int(c) == p.shape[0] * p.shape[1]
  np.testing.assert_allclose(float(s / c), want, rtol=1e-6, atol=1e-6)

  keep = data["has_image"]
  s, c = ml.vision_mapping_loss(jnp.asarray(p), jnp.asarray(bk), jnp.asarray(keep))
  want = _torch_cos_loss(p[keep].reshape(-1, dv), bk[keep].reshape(-1, dv))
  assert int(c) == keep.sum() * p.shape[1]
  np.testing.assert_allclose(float(s / c), want, rtol=1e-6, atol=1e-6)


def test_zero_vectors_follow_torch_epsilon():
  a = np.zeros((2, 4), np.float32)
  b = np.ones((2, 4), np.float32)
  s, c = ml.vision_mapping_loss(jnp.asarray(a[None]), jnp.asarray(b[None]))
  assert float(s / c) == pytest.approx(_torch_cos_loss(a, b)) == pytest.approx(1.0)


def test_fusion_loss_combines_means(data):
  args = [jnp.asarray(data[k]) for k in
          ("logits", "labels", "embeds", "feats", "mask", "patches", "back")]
  loss_fn = jax.jit(ml.fusion_loss, static_argnames=("mapping_weight",))
  loss, aux = loss_fn(*args)
  ce = aux["ce_sum"] / aux["num_tokens"]
  tm = aux["text_map_sum"] / aux["num_instruct_tokens"]
  vm = aux["vision_map_sum"] / aux["num_patches"]
  np.testing.assert_allclose([aux["ce"], aux["text_map"], aux["vision_map"]], [ce, tm, vm],
                             rtol=1e-6)
  np.testing.assert_allclose(float(loss), float(ce + 0.1 * (tm + vm)), rtol=1e-6)
  loss2, _ = loss_fn(*args, mapping_weight=0.5)
  np.testing.assert_allclose(float(loss2), float(ce + 0.5 * (tm + vm)), rtol=1e-6)

  # gradients flow into every input (no stop-gradient anywhere), all finite
  grads = jax.grad(lambda lg, e, f, p, b: ml.fusion_loss(lg, args[1], e, f, args[4], p, b)[0],
                   argnums=(0, 1, 2, 3, 4))(args[0], args[2], args[3], args[5], args[6])
  for g in grads:
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0


def test_empty_terms_do_not_nan():
  z = jnp.zeros((1, 3, 4))
  loss, aux = ml.fusion_loss(jnp.zeros((1, 3, 5)), jnp.full((1, 3), -100), z, z,
                             jnp.zeros((1, 3), bool), z, z, sample_mask=jnp.array([False]))
  assert float(aux["num_tokens"]) == 0 and np.isfinite(float(loss)) and float(loss) == 0.0
