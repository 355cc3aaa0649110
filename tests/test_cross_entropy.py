"""Vocab-sharded cross entropy (jax.shard_map) == a plain fp32 log-softmax version."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.parallel.cross_entropy import cross_entropy, shift_labels
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
