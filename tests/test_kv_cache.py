"""KV cache: prefill + single-token decode steps reproduce one full forward.

Prompts of unequal lengths are right-padded in one batch; every decode step writes at each
example's own slot and position.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.models.llm import Decoder, cache_logical_axes, init_cache, stack_layers
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.models.rope import Llama3Scaling, LongRopeScaling

LLAMA = LLMConfig(arch="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", rope_theta=500000.0,
                  rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 16), max_position_embeddings=128,
                  initializer_range=0.2)
PHI3 = LLMConfig(arch="phi3", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                 num_heads=4, num_kv_heads=4, head_dim=8, dtype="float32", rope_theta=10000.0,
                 rope_scaling=LongRopeScaling((1.0, 1.2, 1.5, 2.0), (1.5, 3.0, 6.0, 12.0), 64),
                 max_position_embeddings=256, initializer_range=0.2)

PROMPT_LENS = np.array([7, 4, 9])
STEPS = 5
MAX_LEN = 16  # >= max prompt + steps


def _params(cfg):
  ids = jnp.zeros((1, 4), jnp.int32)
  pos = jnp.zeros((1, 4), jnp.int32)
  v = Decoder(cfg).init(jax.random.key(1), ids, pos, jnp.ones((1, 4), bool), method=Decoder.forward)
  return nn.unbox(v)["params"]


def _run(cfg, params):
  """Returns (full-forward next-token logits, cached logits), each (B, STEPS + 1, V)."""
  rng = np.random.default_rng(0)
  b = len(PROMPT_LENS)
  total = PROMPT_LENS + STEPS
  s_full = int(total.max())
  tokens = rng.integers(0, cfg.vocab_size, size=(b, s_full))
  full_mask = np.arange(s_full)[None] < total[:, None]
  full_pos = np.where(full_mask, np.arange(s_full)[None], 0)
  fwd = jax.jit(lambda p, i, pos, m: Decoder(cfg).apply({"params": p}, i, pos, m,
                                                        method=Decoder.forward)[0])
  full = np.asarray(fwd(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(full_pos), jnp.asarray(full_mask)))
  # Logits predicting the token after prompt position p-1, then after each continuation token.
  rows = np.arange(b)[:, None]
  want = full[rows, PROMPT_LENS[:, None] - 1 + np.arange(STEPS + 1)[None]]

  p_max = int(PROMPT_LENS.max())
  prompt_mask = np.arange(p_max)[None] < PROMPT_LENS[:, None]
  prompt = np.where(prompt_mask, tokens[:, :p_max], 0)
  prompt_pos = np.where(prompt_mask, np.arange(p_max)[None], 0)

  @jax.jit
  def step(p, ids, pos, mask, cache):
    return Decoder(cfg).apply({"params": p}, ids, pos, mask, cache=cache, method=Decoder.forward)

  cache = init_cache(cfg, b, MAX_LEN, jnp.float32)
  logits, cache = step(params, jnp.asarray(prompt, jnp.int32), jnp.asarray(prompt_pos, jnp.int32),
                       jnp.asarray(prompt_mask), cache)
  np.testing.assert_array_equal(cache["index"], PROMPT_LENS)
  got = [np.asarray(logits)[np.arange(b), PROMPT_LENS - 1]]
  for t in range(STEPS):
    ids = tokens[np.arange(b), PROMPT_LENS + t][:, None]
    pos = (PROMPT_LENS + t)[:, None]
    logits, cache = step(params, jnp.asarray(ids, jnp.int32), jnp.asarray(pos, jnp.int32),
                           jnp.ones((b, 1), bool), cache)
    got.append(np.asarray(logits)[:, 0])
  np.testing.assert_array_equal(cache["index"], PROMPT_LENS + STEPS)
  valid = np.asarray(cache["valid"])
  np.testing.assert_array_equal(valid, np.arange(MAX_LEN)[None] < (PROMPT_LENS + STEPS)[:, None])
  return want, np.stack(got, axis=1)


@pytest.mark.parametrize("cfg", [LLAMA, PHI3], ids=["llama_gqa", "phi3_longrope"])
def test_prefill_and_decode_match_full_forward(cfg):
  params = _params(cfg)
  want, got = _run(cfg, params)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_scanned_cache_layout_matches():
  cfg = LLAMA.replace(scan_layers=True)
  cache = init_cache(cfg, 3, MAX_LEN)
  assert cache["k"].shape == (cfg.num_layers, 3, MAX_LEN, cfg.num_kv_heads, cfg.head_dim)
  assert cache["k"].dtype == jnp.float32
  assert jax.tree.structure(cache_logical_axes(cfg), is_leaf=lambda x: isinstance(
      x, jax.sharding.PartitionSpec)) == jax.tree.structure(cache)
  want, got = _run(cfg, stack_layers(_params(LLAMA)))
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)


def test_unscanned_cache_is_per_layer():
  cache = Decoder(LLAMA).init_cache(2, 8, jnp.bfloat16)
  assert len(cache["k"]) == LLAMA.num_layers
  assert cache["k"][0].shape == (2, 8, LLAMA.num_kv_heads, LLAMA.head_dim)
  assert cache["v"][1].dtype == jnp.bfloat16
  assert cache["valid"].shape == (2, 8) and cache["index"].shape == (2,)
