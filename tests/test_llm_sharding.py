"""Decoder on a (data 2, fsdp 2, tensor 2) mesh of 8 virtual CPU devices: parameters are
sharded as the logical rules say and the sharded forward equals the single-device one."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from fusion_jax.models.llm import Decoder, cache_logical_axes, init_cache
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.models.rope import Llama3Scaling
from fusion_jax.parallel.sharding import DEFAULT_RULES, logical_to_sharding, make_mesh, param_shardings

CFG = LLMConfig(arch="llama", vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32", rope_theta=500000.0,
                rope_scaling=Llama3Scaling(8.0, 1.0, 4.0, 16), max_position_embeddings=128,
                initializer_range=0.2)
B, S = 4, 12


def _inputs():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, CFG.vocab_size, size=(B, S)).astype(np.int32)
  lengths = np.array([12, 9, 12, 5])
  mask = np.arange(S)[None] < lengths[:, None]
  pos = np.where(mask, np.arange(S)[None], 0).astype(np.int32)
  return ids, pos, mask


@pytest.fixture(scope="module")
def mesh():
  if jax.device_count() < 8:
    pytest.fail("needs 8 devices: tests/conftest.py sets --xla_force_host_platform_device_count=8")
  return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


def _sharded_init(cfg, mesh):
  ids, pos, mask = (jnp.asarray(x) for x in _inputs())
  init = lambda k: Decoder(cfg).init(k, ids, pos, mask, method=Decoder.forward)
  abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = param_shardings(abstract, mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    variables = jax.jit(init, out_shardings=shardings)(jax.random.key(0))
  return nn.unbox(variables)["params"]


def test_params_are_sharded_by_the_rules(mesh):
  params = _sharded_init(CFG, mesh)
  layer = params["layers_0"]
  assert layer["self_attn"]["q_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["self_attn"]["k_proj"]["kernel"].sharding.spec == P("fsdp", "tensor", None)
  assert layer["self_attn"]["o_proj"]["kernel"].sharding.spec == P("tensor", None, "fsdp")
  assert layer["mlp"]["gate_proj"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["mlp"]["down_proj"]["kernel"].sharding.spec == P("tensor", "fsdp")
  assert params["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")
  assert params["lm_head"]["kernel"].sharding.spec == P("fsdp", "tensor")
  assert layer["input_layernorm"]["scale"].sharding.spec == P(None)
  # Actually split: each device holds a quarter of q_proj (fsdp 2 x tensor 2).
  q = layer["self_attn"]["q_proj"]["kernel"]
  assert q.addressable_shards[0].data.shape == (16, 2, 8)

  scanned = _sharded_init(CFG.replace(scan_layers=True), mesh)
  assert scanned["layers"]["self_attn"]["q_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor", None)


def test_sharded_forward_equals_single_device(mesh):
  params = _sharded_init(CFG, mesh)
  host_params = jax.device_get(params)
  ids, pos, mask = _inputs()
  fwd = lambda p, i, ps, m: Decoder(CFG).apply({"params": p}, i, ps, m, method=Decoder.forward)[0]
  ref = np.asarray(jax.jit(fwd)(host_params, ids, pos, mask))

  batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    args = [jax.device_put(x, batch_sharding) for x in (ids, pos, mask)]
    out = jax.jit(fwd)(params, *args)
  assert out.sharding.spec == P(("data", "fsdp"), None, "tensor")
  np.testing.assert_allclose(np.asarray(out)[mask], ref[mask], atol=1e-5, rtol=0)

  # Prefill into a cache sharded by cache_logical_axes gives the same logits.
  cache_sh = logical_to_sharding(cache_logical_axes(CFG), mesh, DEFAULT_RULES)
  assert cache_sh["k"][0].spec == P(("data", "fsdp"), None, "tensor", None)
  step = lambda p, i, ps, m, c: Decoder(CFG).apply({"params": p}, i, ps, m, cache=c,
                                                   method=Decoder.forward)
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    cache = jax.device_put(init_cache(CFG, B, 16), cache_sh)
    logits, cache = jax.jit(step)(params, *args, cache)
  assert cache["k"][1].sharding.is_equivalent_to(cache_sh["k"][1], 4)
  np.testing.assert_allclose(np.asarray(logits)[mask], ref[mask], atol=1e-5, rtol=0)
