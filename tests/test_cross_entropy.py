"""Vocab-sharded cross entropy (jax.shard_map) == a plain fp32 log-softmax version."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.parallel.cross_entropy import cross_entropy, lm_head_cross_entropy, shift_labels
from fusion_jax.parallel.sharding import DEFAULT_RULES, make_mesh

B, S, V = 8, 12, 96


def plain_cross_entropy(logits, labels):
  """Reference: next-token CE on fp32 logits, full log-softmax, -100 ignored -> (sum, count)."""
  logits = logits[:, :-1].astype(jnp.float32)
  targets = labels[:, 1:]
  mask = targets != -100
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.where(mask, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask).astype(jnp.float32)


@pytest.fixture(scope="module")
def data():
  logits = 4.0 * jax.random.normal(jax.random.key(0), (B, S, V), jnp.float32)
  labels = jax.random.randint(jax.random.key(1), (B, S), 0, V)
  # Unsupervised prefix and right padding of varying length, plus ids in every vocab shard.
  pos = jnp.arange(S)[None]
  lengths = jnp.arange(B)[:, None] % 5 + 7
  labels = jnp.where((pos < 2) | (pos >= lengths), -100, labels)
  labels = labels.at[0, 3].set(0).at[0, 4].set(V - 1).at[1, 5].set(V // 2)
  return logits, labels


@pytest.fixture(scope="module")
def mesh():
  return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _sharded(mesh, x):
  return jax.device_put(x, jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor")))


def test_shift_labels():
  labels = jnp.array([[-100, 5, 6, -100]])
  np.testing.assert_array_equal(shift_labels(labels), [[5, 6, -100, -100]])


def test_sharded_equals_plain_value_and_grad(data, mesh):
  logits, labels = data

  def mean_ce(fn, x):
    s, c = fn(x, labels)
    return s / c, (s, c)

  with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(lambda x: mean_ce(cross_entropy, x), has_aux=True))
    (v, (s, c)), g = fn(_sharded(mesh, logits))
  (v_ref, (s_ref, c_ref)), g_ref = jax.value_and_grad(
      lambda x: mean_ce(plain_cross_entropy, x), has_aux=True)(logits)
  assert float(c) == float(c_ref) > 0
  np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-6)
  np.testing.assert_allclose(float(v), float(v_ref), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-7)


def test_bf16_logits_upcast(data, mesh):
  logits, labels = data
  x = logits.astype(jnp.bfloat16)
  with jax.set_mesh(mesh):
    s, c = jax.jit(lambda x: cross_entropy(x, labels))(_sharded(mesh, x))
  s_ref, c_ref = plain_cross_entropy(x, labels)
  np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-6)
  assert float(c) == float(c_ref)


def test_vocab_over_two_mesh_axes(data, mesh):
  """Rules may split the vocabulary over several mesh axes (fsdp x tensor = 4 shards)."""
  logits, labels = data
  rules = tuple(("vocab", ("fsdp", "tensor")) if k == "vocab" else
                ("batch", "data") if k == "batch" else (k, v) for k, v in DEFAULT_RULES)
  with jax.set_mesh(mesh):
    s, c = jax.jit(lambda x: cross_entropy(x, labels, rules=rules))(logits)
  s_ref, _ = plain_cross_entropy(logits, labels)
  np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-6)


def test_without_mesh_matches(data):
  logits, labels = data
  s, c = cross_entropy(logits, labels)
  s_ref, c_ref = plain_cross_entropy(logits, labels)
  np.testing.assert_allclose(float(s), float(s_ref), rtol=1e-6)
  assert float(c) == float(c_ref)


def test_full_logits_never_gathered(data, mesh):
  """No collective in the compiled SPMD program moves logits (full or per-shard vocab rows)."""
  logits, labels = data
  with jax.set_mesh(mesh):
    fn = jax.jit(jax.grad(lambda x: cross_entropy(x, labels)[0]))
    hlo = fn.lower(_sharded(mesh, logits)).compile().as_text()
  full_vocab = re.compile(
      rf"= \w+\[[\d,]*\b({V}|{V // 2})\]\S* (all-gather|all-to-all|collective-permute|all-reduce)")
  assert "all-reduce" in hlo  # the per-token max / sum-exp / target reductions
  assert not full_vocab.search(hlo), full_vocab.search(hlo).group(0)


def test_vocab_not_divisible_is_a_clear_error(mesh):
  logits = jnp.zeros((4, 4, 7))
  labels = jnp.zeros((4, 4), jnp.int32)
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="not divisible"):
    cross_entropy(logits, labels)


# -- lm_head_cross_entropy: the LM head inside the loss, per token chunk (no (B, S, V) logits) --
D = 16


@pytest.fixture(scope="module")
def head(data):
  _, labels = data
  hidden = jax.random.normal(jax.random.key(2), (B, S, D), jnp.float32)
  kernel = jax.random.normal(jax.random.key(3), (D, V), jnp.float32)
  return hidden, kernel, labels


def _mean_ce_unchunked(hidden, kernel, labels, dtype=jnp.float32):
  s, c = cross_entropy(jnp.dot(hidden.astype(dtype), kernel.astype(dtype)).astype(jnp.float32),
                       labels)
  return s / c


def _mean_ce_chunked(hidden, kernel, labels, chunks, dtype=jnp.float32):
  s, c = lm_head_cross_entropy(hidden, kernel, labels, chunks=chunks, dtype=dtype)
  return s / c


@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_chunked_equals_unchunked_value_and_grads(head, mesh, chunks):
  hidden, kernel, labels = head
  want, (gh_ref, gk_ref) = jax.value_and_grad(_mean_ce_unchunked, argnums=(0, 1))(
      hidden, kernel, labels)
  fn = jax.jit(jax.value_and_grad(_mean_ce_chunked, argnums=(0, 1)), static_argnums=3)
  got, (gh, gk) = fn(hidden, kernel, labels, chunks)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-6)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gk_ref), atol=1e-6)
  # Sharded: batch over data x fsdp, the kernel's vocab over tensor and its embed over fsdp.
  with jax.set_mesh(mesh):
    h = jax.device_put(hidden, jax.NamedSharding(mesh, jax.P(("data", "fsdp"), None, None)))
    k = jax.device_put(kernel, jax.NamedSharding(mesh, jax.P("fsdp", "tensor")))
    got, (gh, gk) = fn(h, k, labels, chunks)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gh), np.asarray(gh_ref), atol=1e-6)
  np.testing.assert_allclose(np.asarray(gk), np.asarray(gk_ref), atol=1e-6)


def test_chunked_bf16_head_matches_unchunked(head):
  """In bf16 both compute the logits in bf16 and upcast: the same numbers, chunk by chunk."""
  hidden, kernel, labels = head
  want = _mean_ce_unchunked(hidden, kernel, labels, jnp.bfloat16)
  got = jax.jit(_mean_ce_chunked, static_argnums=(3, 4))(hidden, kernel, labels, 4, jnp.bfloat16)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_chunked_never_holds_the_whole_logits():
  """The compiled gradient has no (B, S, V) buffer, only (B, S / chunks, V) chunks."""
  b, s, d, v, chunks = 2, 64, 8, 512, 8
  hidden = jnp.ones((b, s, d), jnp.float32)
  kernel = jnp.ones((d, v), jnp.float32)
  labels = jnp.zeros((b, s), jnp.int32)
  grad = jax.jit(jax.grad(_mean_ce_chunked, argnums=(0, 1)), static_argnums=3)
  hlo = grad.lower(hidden, kernel, labels, chunks).compile().as_text()
  assert f"f32[{b},{s // chunks},{v}]" in hlo
  assert f"f32[{b},{s},{v}]" not in hlo
  ref = jax.jit(jax.grad(_mean_ce_unchunked, argnums=(0, 1))).lower(hidden, kernel, labels)
  assert f"f32[{b},{s},{v}]" in ref.compile().as_text()


def test_chunks_must_divide_the_sequence(head):
  hidden, kernel, labels = head
  with pytest.raises(ValueError, match="loss_chunks=5 must divide the sequence length 12"):
    lm_head_cross_entropy(hidden, kernel, labels, chunks=5, dtype=jnp.float32)


@pytest.mark.parametrize("chunks", [1, 4])
def test_padded_head_equals_unpadded_with_an_odd_vocabulary(mesh, chunks):
  """An odd vocabulary (95) padded to 128 columns: the same loss and gradients, and the
  vocab-sharded loss runs on it (95 columns do not split over the tensor axis, 128 do)."""
  v = 95
  hidden = jax.random.normal(jax.random.key(4), (B, S, D), jnp.float32)
  kernel = jax.random.normal(jax.random.key(5), (D, v), jnp.float32)
  labels = jax.random.randint(jax.random.key(6), (B, S), 0, v).at[:, :2].set(-100)
  labels = labels.at[0, 5].set(v - 1)
  want, g_want = jax.value_and_grad(_mean_ce_unchunked, argnums=(0, 1))(hidden, kernel, labels)

  def padded(h, k):
    s, c = lm_head_cross_entropy(h, k, labels, chunks=chunks, dtype=jnp.float32, pad_to=128)
    return s / c

  fn = jax.jit(jax.value_and_grad(padded, argnums=(0, 1)))
  got, g_got = fn(hidden, kernel)
  with jax.set_mesh(mesh):
    got_sharded, g_sharded = fn(hidden, kernel)
  for value, grads in ((got, g_got), (got_sharded, g_sharded)):
    np.testing.assert_allclose(float(value), float(want), rtol=1e-6)
    for a, b in zip(grads, g_want):
      assert a.shape == b.shape
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
