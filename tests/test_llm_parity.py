"""Decoder vs transformers (Llama / Phi-3, float32), scan and remat variants, hooks, configs."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from fusion_jax.convert.hf import load_hf_dir
from fusion_jax.parallel import remat as remat_lib
from fusion_jax.models.llm import Decoder, rope_tables, stack_layers, unstack_layers
from fusion_jax.models.llm_config import LLAMA_3_1_8B, PHI_3_5_MINI, LLMConfig
from fusion_jax.models.rope import Llama3Scaling, LongRopeScaling, longrope_attention_factor
import make_tiny_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  root = tmp_path_factory.mktemp("tiny_hf")
  out = {}
  for name, fn, kw in (("llama", make_tiny_hf.make_tiny_llama, {}),
                       ("llama_mha_noscale", make_tiny_hf.make_tiny_llama,
                        dict(rope_scaling=None, gqa=False, seed=3)),
                       ("llama_tied", make_tiny_hf.make_tiny_llama,
                        dict(tie_word_embeddings=True, seed=6)),
                       ("phi3", make_tiny_hf.make_tiny_phi3, {})):
    d = str(root / name)
    model = fn(d, **kw)
    _, cfg, params = load_hf_dir(d, weights_dtype=np.float32, overrides={"dtype": "float32"})
    out[name] = (model, cfg, params)
  return out


def _inputs(batch, seq, vocab, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, size=(batch, seq))
  lengths = np.array([seq] + [seq - 5] * (batch - 1))
  mask = np.arange(seq)[None] < lengths[:, None]
  positions = np.where(mask, np.arange(seq)[None], 0)
  return ids, mask, positions


_FORWARD = {}


def _forward(cfg, params, ids, positions, mask):
  if cfg not in _FORWARD:  # one jit per config (shapes may vary)
    _FORWARD[cfg] = jax.jit(lambda p, i, pos, m: Decoder(cfg).apply(
        {"params": p}, i, pos, m, method=Decoder.forward)[0])
  return np.asarray(_FORWARD[cfg](params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                                  jnp.asarray(mask)))


def _torch_logits(model, ids, mask):
  with torch.no_grad():
    return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask.astype(np.int64))
                 ).logits.numpy()


@pytest.mark.parametrize("name,seq", [("llama", 40), ("llama_mha_noscale", 40), ("llama_tied", 40),
                                      ("phi3", 24), ("phi3", 48)])
def test_logits_match_transformers(tiny, name, seq):
  model, cfg, params = tiny[name]
  ids, mask, positions = _inputs(2, seq, cfg.vocab_size)
  ref = _torch_logits(model, ids, mask)
  ours = _forward(cfg, params, ids, positions, mask)
  assert ("lm_head" in params) == (not cfg.tie_word_embeddings)
  assert np.abs(ref).max() > 0.5  # non-trivial logits, so the tolerance means something
  np.testing.assert_allclose(ours[mask], ref[mask], atol=1e-4, rtol=0)


def test_bfloat16_compute_tracks_float32(tiny):
  """Default policy (bf16 compute, fp32 params) stays close to the fp32 logits."""
  model, cfg, params = tiny["llama"]
  ids, mask, positions = _inputs(2, 40, cfg.vocab_size)
  ref = _forward(cfg, params, ids, positions, mask)
  out = _forward(cfg.replace(dtype="bfloat16"), params, ids, positions, mask)
  assert out.dtype == np.float32  # logits are returned in fp32 for the loss
  assert np.abs(out - ref)[mask].max() < 0.05 * np.abs(ref).max()


def test_phi3_longrope_regime_switches_with_batch_max_position(tiny):
  """Sequences past original_max (32) use the long factors for every position, as transformers."""
  model, cfg, params = tiny["phi3"]
  tables = rope_tables(cfg)
  assert tables.switch_at == make_tiny_hf.PHI3_ORIGINAL_MAX
  assert tables.scale == pytest.approx(math.sqrt(1 + math.log(128 / 32) / math.log(32)))
  ids, mask, positions = _inputs(1, 48, cfg.vocab_size, seed=5)
  long_run = _forward(cfg, params, ids, positions, mask)[:, :24]
  short_run = _forward(cfg, params, ids[:, :24], positions[:, :24], mask[:, :24])
  assert np.abs(long_run - short_run).max() > 1e-3  # the prefix changed regime
  np.testing.assert_allclose(short_run, _torch_logits(model, ids[:, :24], mask[:, :24]), atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_scan_layers_equals_unrolled(tiny, name):
  _, cfg, params = tiny[name]
  ids, mask, positions = _inputs(2, 40, cfg.vocab_size, seed=1)
  ref = _forward(cfg, params, ids, positions, mask)
  stacked = stack_layers(params)
  assert stacked["layers"]["self_attn"]["q_proj"]["kernel"].shape[0] == cfg.num_layers
  out = _forward(cfg.replace(scan_layers=True), stacked, ids, positions, mask)
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0)
  back = unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_policies_give_same_gradients(scan):
  base = LLMConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", scan_layers=scan,
                   max_position_embeddings=64)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  mask = jnp.ones((2, 8), bool)
  params = nn.unbox(Decoder(base).init(jax.random.key(0), ids, pos, mask, method=Decoder.forward))["params"]

  def grads(cfg):
    loss = lambda p: jnp.sum(jnp.square(Decoder(cfg).apply({"params": p}, ids, pos, mask,
                                                            method=Decoder.forward)[0]))
    return jax.jit(jax.grad(loss))(params)

  ref = grads(base)
  # Every name resolves; a representative few are compiled (each costs a compile on CI).
  for name in remat_lib.POLICY_NAMES:
    remat_lib.policy_from_name(name)
  policies = ("full", "save_qkv_proj") if scan else ("dots_with_no_batch_dims", "save_attn_out")
  for policy in policies:
    g = grads(base.replace(remat_policy=policy))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5), g, ref)


def test_unknown_remat_policy_lists_valid_names():
  with pytest.raises(ValueError, match="valid names: none, full, dots"):
    remat_lib.policy_from_name("everything")
  with pytest.raises(ValueError, match="unknown remat policy"):
    LLMConfig(remat_policy="bogus")


class _Parent(nn.Module):
  """Owns a Dense and hands the decoder a hook that calls it after layer 0."""
  cfg: LLMConfig

  def setup(self):
    self.decoder = Decoder(self.cfg)
    self.side = nn.Dense(self.cfg.hidden_size, use_bias=False,
                         kernel_init=nn.initializers.normal(0.5))

  def __call__(self, ids, pos, mask):
    calls = []

    def hook(i, h):
      calls.append(i)
      return h + self.side(h) if i == 0 else h

    h, _ = self.decoder(self.decoder.embed(ids), pos, mask, hook=hook)
    self.sow("intermediates", "calls", jnp.asarray(calls))
    return self.decoder.logits(h)


def test_hook_with_parent_submodule():
  cfg = LLMConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", max_position_embeddings=64)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(8), (2, 8))
  mask = jnp.ones((2, 8), bool)
  variables = _Parent(cfg).init(jax.random.key(0), ids, pos, mask)
  params = nn.unbox(variables["params"])
  assert set(params) == {"decoder", "side"}
  assert params["side"]["kernel"].shape == (32, 32)
  out, state = _Parent(cfg).apply({"params": params}, ids, pos, mask, mutable=["intermediates"])
  np.testing.assert_array_equal(state["intermediates"]["calls"][0], [0, 1])
  plain = Decoder(cfg).apply({"params": params["decoder"]}, ids, pos, mask, method=Decoder.forward)[0]
  assert np.abs(np.asarray(out) - np.asarray(plain)).max() > 1e-3  # the hook changed the output
  zero = jax.tree.map(jnp.zeros_like, params["side"])
  out0 = _Parent(cfg).apply({"params": {**params, "side": zero}}, ids, pos, mask)
  np.testing.assert_allclose(out0, plain, atol=1e-6)
  with pytest.raises(ValueError, match="scan_layers=False"):
    _Parent(cfg.replace(scan_layers=True)).init(jax.random.key(0), ids, pos, mask)


def test_presets_have_the_published_sizes():
  p = PHI_3_5_MINI
  assert (p.num_layers, p.hidden_size, p.num_heads, p.num_kv_heads, p.intermediate_size,
          p.vocab_size, p.head_dim) == (32, 3072, 32, 32, 8192, 32064, 96)
  assert isinstance(p.rope_scaling, LongRopeScaling)
  assert len(p.rope_scaling.short_factor) == len(p.rope_scaling.long_factor) == 48
  assert p.rope_scaling.long_factor[-1] == pytest.approx(64.83999633789062)
  assert p.rope_scaling.original_max_position_embeddings == 4096
  assert longrope_attention_factor(p.rope_scaling, p.max_position_embeddings) == pytest.approx(
      math.sqrt(1 + math.log(32) / math.log(4096)))
  q = LLAMA_3_1_8B
  assert (q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.intermediate_size,
          q.vocab_size, q.rope_theta, q.rms_norm_eps) == (32, 4096, 32, 8, 14336, 128256, 500000.0, 1e-5)
  assert q.rope_scaling == Llama3Scaling(8.0, 1.0, 4.0, 8192)


def test_config_round_trips_and_hf_forms():
  for cfg in (PHI_3_5_MINI, LLAMA_3_1_8B):
    assert LLMConfig.from_dict(cfg.to_dict()) == cfg
    assert LLMConfig.from_hf(cfg.to_hf()).replace(pad_token_id=cfg.pad_token_id) == cfg
    hash(cfg)
  # transformers 4.x config.json forms (rope_scaling + top-level rope_theta).
  llama4 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
            "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
            "rope_theta": 500000.0, "max_position_embeddings": 131072, "hidden_act": "silu",
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "tie_word_embeddings": False}
  assert LLMConfig.from_hf(llama4).replace(pad_token_id=128002) == LLAMA_3_1_8B
  phi4 = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
          "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "max_position_embeddings": 131072,
          "original_max_position_embeddings": 4096, "sliding_window": 262144, "pad_token_id": 32000,
          "rope_scaling": {"type": "longrope", "short_factor": list(PHI_3_5_MINI.rope_scaling.short_factor),
                           "long_factor": list(PHI_3_5_MINI.rope_scaling.long_factor)}}
  assert LLMConfig.from_hf(phi4).replace(pad_token_id=0) == PHI_3_5_MINI
  with pytest.raises(ValueError, match="hidden_act"):
    LLMConfig.from_hf({**llama4, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="supported: llama"):
    LLMConfig.from_hf({**llama4, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
  with pytest.raises(ValueError, match="unknown keys"):
    LLMConfig.from_dict({"arch": "llama", "hiddensize": 3})
