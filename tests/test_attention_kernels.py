"""Decoder attention kernels (fusion_jax.models.attention_kernels) against the XLA path, fp32:
splash in Pallas interpret mode, the cuDNN wrapper through jax.nn's XLA implementation."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.models import attention_kernels as ak
from fusion_jax.models.attention import causal_mask, dot_product_attention
from fusion_jax.models.llm import Decoder
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.parallel.sharding import DEFAULT_RULES, make_mesh

B, S, H, KV, HD = 2, 200, 4, 2, 16  # S not a multiple of 128: splash pads the rows
# Row 0: two packed samples (90 + 70 tokens) and padding; row 1: one sample of 130.
SEG = np.zeros((B, S), np.int32)
SEG[0, :90], SEG[0, 90:160], SEG[1, :130] = 1, 2, 1


def _qkv(seed=0, kv=KV):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, S, n, HD)), jnp.float32) for n in (H, kv, kv))


def test_segments_equal_separate_rows():
  q, k, v = _qkv()
  packed = jax.jit(ak.causal_attention, static_argnames="impl")(q, k, v, jnp.asarray(SEG),
                                                                  impl="xla")
  attend = jax.jit(lambda q, k, v: dot_product_attention(
      q, k, v, causal_mask(jnp.ones(q.shape[:2], bool))))
  for lo, hi in ((0, 90), (90, 160)):
    alone = attend(q[:1, lo:hi], k[:1, lo:hi], v[:1, lo:hi])
    np.testing.assert_allclose(packed[:1, lo:hi], alone, atol=1e-5)


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_kernel_matches_xla_forward_and_grad(impl):
  q, k, v = _qkv()
  seg = jnp.asarray(SEG)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(B, S, H, HD)), jnp.float32)

  def loss(q, k, v, impl):
    out = ak.causal_attention(q, k, v, seg, impl=impl, cudnn_implementation="xla")
    return jnp.sum(out * w), out

  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, ref), gref = vg(q, k, v, "xla")
  (_, out), got = vg(q, k, v, impl)
  np.testing.assert_allclose(out, ref, atol=1e-5)  # every row, padding rows included
  for g, r in zip(got, gref):
    np.testing.assert_allclose(g, r, atol=1e-5)


# kv heads split with the q heads / repeated first (KV = 1 < 2 tensor shards)
@pytest.mark.parametrize("impl,kv", [("cudnn", KV), ("cudnn", 1), ("splash", KV)])
def test_sharded_kernel_matches_xla(impl, kv):
  mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, k, v = _qkv(2, kv)
  seg = jnp.asarray(SEG)
  ref = ak.causal_attention(q, k, v, seg, impl="xla")
  with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    out = jax.jit(lambda q, k, v, s: ak.causal_attention(
        q, k, v, s, impl=impl, cudnn_implementation="xla"))(q, k, v, seg)
  np.testing.assert_allclose(out, ref, atol=1e-5)


# One sample per row, real tokens first (the P = 1 batch contract): lengths instead of a mask.
SEG1 = np.zeros((B, S), np.int32)
SEG1[0, :160], SEG1[1, :130] = 1, 1
LENGTHS = jnp.asarray([160, 130], jnp.int32)


def _lengths_route_matches_mask(seg_np, lengths, seed: int, sharded: bool) -> np.ndarray:
  """The cuDNN wrapper (jax's XLA path) with `lengths` gives the segment-mask route's output on
  real rows and its q / k / v gradients to 1e-5 when only real rows feed the loss, as in the
  model; returns the lengths route's output (padding rows included)."""
  q, k, v = _qkv(seed, 1 if sharded else KV)
  seg, real = jnp.asarray(seg_np), jnp.asarray(seg_np > 0)[:, :, None, None]
  w = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(B, S, H, HD)), jnp.float32) * real

  def loss(q, k, v, lengths):
    out = ak.causal_attention(q, k, v, seg, lengths=lengths, impl="cudnn",
                              cudnn_implementation="xla")
    return jnp.sum(out * w), out

  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  (_, ref), gref = vg(q, k, v, None)  # the segment-mask route
  if sharded:
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})), \
        nn.logical_axis_rules(DEFAULT_RULES):
      (_, out), got = vg(q, k, v, lengths)
  else:
    (_, out), got = vg(q, k, v, lengths)
  np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5)
  for g, r in zip(got, gref):
    np.testing.assert_allclose(g, r, atol=1e-5)
  return np.asarray(out)


@pytest.mark.parametrize("sharded", [False, True])
def test_cudnn_lengths_route_matches_mask_on_real_rows(sharded):
  out = _lengths_route_matches_mask(SEG1, LENGTHS, 3, sharded)
  assert np.isfinite(out).all()  # padding rows: finite, read by nothing


# Packed rows under the batch contract: row 0 two samples (90 + 70) then padding, row 1 one
# sample (130) and an empty second slot: cuDNN's packed-segment layout, -1 for the empty slot.
SLOT_LENGTHS = jnp.asarray([[90, 70], [130, 0]], jnp.int32)


def test_slot_lengths():
  np.testing.assert_array_equal(ak.slot_lengths(jnp.asarray(SEG), 2), SLOT_LENGTHS)


@pytest.mark.parametrize("sharded", [False, True])
def test_cudnn_packed_route_matches_mask_on_real_rows(sharded):
  out = _lengths_route_matches_mask(SEG, SLOT_LENGTHS, 5, sharded)
  assert not out[~(SEG > 0)].any()  # padding rows: zero


def test_decoder_passes_lengths_only_for_prefix_rows(monkeypatch):
  cfg = LLMConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32")
  seen = []

  def spy(q, k, v, segment_ids, *, lengths=None, impl="auto"):
    seen.append(lengths)
    return dot_product_attention(q, k, v, ak.segment_mask(segment_ids))

  monkeypatch.setattr(ak, "causal_attention", spy)
  dec = Decoder(cfg)
  tm = jnp.asarray(np.arange(12)[None] < np.array([[12], [7]]))
  pos = jnp.broadcast_to(jnp.arange(12), (2, 12))
  params = dec.init(jax.random.key(0), jnp.zeros((2, 12, 32)), pos, tm)
  for prefix in (False, True):
    seen.clear()
    dec.apply(params, jnp.zeros((2, 12, 32)), pos, tm, prefix_rows=prefix)
    assert seen and all((x is None) != prefix for x in seen)
    if prefix:
      np.testing.assert_array_equal(seen[0], [12, 7])


@pytest.mark.parametrize("scan", [True, False])  # scanned first: a fresh process
def test_decoder_splash_matches_xla(scan):
  # Plumbing: LLMConfig.attention_impl reaches SelfAttention (kernel gradients: above). Scanned,
  # the splash kernel is first built inside Flax's scan during init (a kernel cached across
  # traces once leaked that trace's tracers there).
  cfg = LLMConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=2 if scan else 1, num_heads=4, num_kv_heads=2, head_dim=8,
                  dtype="float32", rope_theta=10000.0, max_position_embeddings=256,
                  attention_impl="xla", scan_layers=scan)
  seg = SEG[:, :128]
  ids = jnp.asarray(np.random.default_rng(3).integers(0, 64, seg.shape), jnp.int32)
  mask = jnp.asarray(seg > 0)
  pos = jnp.asarray(np.where(seg > 0, np.arange(128)[None], 0), jnp.int32)
  params = Decoder(cfg.replace(attention_impl="splash")).init(
      jax.random.key(0), ids, pos, mask, method=Decoder.forward)["params"]
  fwd = jax.jit(lambda p, cfg: Decoder(cfg).apply({"params": p}, ids, pos, mask,
                                                  method=Decoder.forward)[0], static_argnums=1)
  ref = fwd(params, cfg)
  got = fwd(params, cfg.replace(attention_impl="splash"))
  np.testing.assert_allclose(got, ref, atol=1e-5)


def test_splash_step_has_no_float32_scores():
  # The target, checked in the lowered program: XLA materialises (B, H, S, S) float32
  # scores; splash works in (512, 512) blocks. (benchmarks/step_mfu.py checks the compiled step.)
  s = 1024
  cfg = LLMConfig(arch="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                  num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8, dtype="float32",
                  rope_theta=10000.0, max_position_embeddings=2048)
  ids, pos, mask = jnp.zeros((1, s), jnp.int32), jnp.arange(s)[None], jnp.ones((1, s), bool)
  params = jax.eval_shape(lambda k: Decoder(cfg).init(k, ids, pos, mask, method=Decoder.forward),
                          jax.random.key(0))["params"]
  for impl, expect in (("xla", True), ("splash", False)):
    c = cfg.replace(attention_impl=impl)
    grad = jax.grad(lambda p: jnp.sum(Decoder(c).apply({"params": p}, ids, pos, mask,
                                                       method=Decoder.forward)[0]))
    text = jax.jit(grad).lower(params).as_text()
    assert bool(re.search(rf"tensor<(\d+x)*{s}x{s}xf32>", text)) == expect, impl


def test_resolve_and_errors():
  assert ak.resolve_impl("auto", jnp.float32, "cpu") == "xla"
  assert ak.resolve_impl("auto", jnp.bfloat16, "tpu") == "splash"
  assert ak.resolve_impl("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert ak.resolve_impl("auto", jnp.float32, "gpu") == "xla"  # cuDNN runs bf16/fp16 only
  with pytest.raises(ValueError, match="attention_impl"):
    LLMConfig(attention_impl="flash")
  q, k, v = _qkv()
  with pytest.raises(ValueError, match="needs an NVIDIA GPU"):
    ak.causal_attention(q, k, v, jnp.asarray(SEG), impl="cudnn")


@pytest.mark.parametrize("samples,latents,prefix", [(1, True, True), (1, False, False),
                                                    (2, True, True), (2, False, False)])
def test_fusion_passes_lengths_only_for_contract_rows(monkeypatch, samples, latents, prefix):
  """Rows keep each sample's tokens contiguous from the row start: lengths per row (P = 1) or
  per sample slot (packed rows); the latents ablation (latent slots masked out of the row's
  middle) takes the segment mask."""
  import dataclasses

  from fusion_jax.models import fusion
  from fusion_jax.models.presets import TINY
  cfg = dataclasses.replace(TINY, latents=latents)
  batch = fusion.example_batch(cfg, batch_size=2, seq_len=64, max_questions=2, q=4,
                               samples_per_row=samples)
  seen = []

  def spy(q, k, v, segment_ids, *, lengths=None, impl="auto"):
    seen.append(lengths)
    return dot_product_attention(q, k, v, ak.segment_mask(segment_ids))

  monkeypatch.setattr(ak, "causal_attention", spy)
  params = fusion.init(jax.random.key(0), cfg, batch)["params"]
  seen.clear()
  fusion.loss_fn(params, batch, cfg)
  assert seen and all((x is not None) == prefix for x in seen)
  if prefix and samples == 1:
    np.testing.assert_array_equal(seen[0], np.asarray(batch["token_mask"]).sum(-1))
  elif prefix:
    seg = np.asarray(batch["segment_ids"])
    np.testing.assert_array_equal(seen[0], [[(r == j).sum() for j in (1, 2)] for r in seg])


def test_fusion_packed_rows_through_the_cudnn_packed_route(monkeypatch):
  """A packed FUSION batch (P = 3, a row with empty slots) gives the XLA path's loss through
  the cuDNN wrapper's packed-segment route (emulated; its gradients: the kernel tests above)."""
  from fusion_jax.models import batch_spec, fusion
  from fusion_jax.models.presets import TINY
  exs = fusion.example_samples(TINY, 4, seq_len=32, max_questions=2, q=4, seed=0)
  batch = batch_spec.pack_examples([exs[:3], exs[3:]], seq_len=96, samples_per_row=3, pad_id=0)
  np.testing.assert_array_equal(ak.slot_lengths(jnp.asarray(batch["segment_ids"]), 3)[1, 1:],
                                [0, 0])  # row 1: one sample, two empty slots
  params = fusion.init(jax.random.key(0), TINY, batch)["params"]
  loss = lambda: jax.jit(lambda p: fusion.loss_fn(p, batch, TINY)[0])  # noqa: E731
  ref = loss()(params)
  real, seen = ak.causal_attention, []

  def packed(q, k, v, segment_ids, *, lengths=None, impl="auto"):
    seen.append(lengths.shape)
    return real(q, k, v, segment_ids, lengths=lengths, impl="cudnn", cudnn_implementation="xla")

  monkeypatch.setattr(ak, "causal_attention", packed)
  got = loss()(params)  # traced again, through the patched kernel
  assert seen and all(shape == (2, 3) for shape in seen)
  np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_parity_benchmark_runs_every_route():
  """benchmarks/attention_parity.py (gpu_run.sh's first check on a GPU), emulated here in fp32."""
  from experiment_helpers import load_benchmark
  mod = load_benchmark("attention_parity")
  args = mod.cli.parse(mod.define_flags, ["--seq", "128", "--heads", "4", "--kv_heads", "2",
                                          "--head_dim", "16", "--dtype", "float32",
                                          "--impls", "cudnn"], mod.PROG)
  got = mod.check(args)
  assert [(i, r) for i, r, _ in got] == [("cudnn", "mask"), ("cudnn", "lengths"),
                                         ("cudnn", "packed"), ("cudnn", "full"),
                                         ("cudnn", "keys")]
  assert all(e < 1e-5 for _, _, e in got)
  packed, single = mod.segments(2, 128)
  assert set(np.unique(packed[0])) == {0, 1, 2} and set(np.unique(single)) == {0, 1}


def _assert_kernel_matches_xla(loss, qkv, sharded: bool, impl: str) -> jax.Array:
  """loss(q, k, v, impl) -> (scalar, out): the kernel `impl` (the cudnn wrapper on jax's XLA
  path, splash in interpret mode; on a mesh if `sharded`) gives the XLA path's output and
  q / k / v gradients to 1e-5; returns the XLA output."""
  vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
  (_, ref), gref = vg(*qkv, "xla")
  if sharded:
    with jax.set_mesh(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})), \
        nn.logical_axis_rules(DEFAULT_RULES):
      (_, out), got = vg(*qkv, impl)
  else:
    (_, out), got = vg(*qkv, impl)
  np.testing.assert_allclose(out, ref, atol=1e-5)
  for g, r in zip(got, gref):
    np.testing.assert_allclose(g, r, atol=1e-5)
  return ref


# The vision tower's unmasked attention (tiles, plain images): bidirectional, every key, or
# each row's first key_lengths keys.
TOWER_ROUTES = [("cudnn", False), ("cudnn", True), ("splash", False), ("splash", True)]


@pytest.mark.parametrize("impl,sharded", TOWER_ROUTES)
def test_full_attention_kernels_match_xla(impl, sharded):
  q, k, v = _qkv(5, H)  # the tower: as many kv heads as q heads
  w = jnp.asarray(np.random.default_rng(6).normal(size=(B, S, H, HD)), jnp.float32)
  key_lengths = jnp.asarray([S, 150], jnp.int32)

  def loss(q, k, v, impl):
    out = ak.full_attention(q, k, v, impl=impl, cudnn_implementation="xla")
    short = ak.full_attention(q, k, v, key_lengths=key_lengths, impl=impl,
                              cudnn_implementation="xla")
    return jnp.sum((out + 2 * short) * w), jnp.stack([out, short])

  ref = _assert_kernel_matches_xla(loss, (q, k, v), sharded, impl)
  np.testing.assert_allclose(ref[0], dot_product_attention(q, k, v), atol=1e-6)
  keys = jnp.arange(S)[None, None, None, :] < key_lengths[:, None, None, None]
  np.testing.assert_allclose(ref[1], dot_product_attention(q, k, v, keys), atol=1e-6)


@pytest.mark.parametrize("impl,sharded", TOWER_ROUTES)
def test_key_padding_attention_matches_xla(impl, sharded):
  """The text-guided image's rule: valid keys first (lengths route) or not (the cond's XLA
  branch), with uniform rows, against the XLA path's mask + uniform rows, forward and grad."""
  q, k, v = _qkv(10, H)
  valid = np.zeros((B, S), bool)
  valid[0, :150], valid[1, :S - 7] = True, True
  ragged = valid.copy()
  ragged[1, 20] = False  # a hole: not a prefix
  uniform = jnp.asarray(np.arange(S)[None] >= np.array([[140], [180]]))
  assert ak.valid_keys_first(jnp.asarray(valid)) and not ak.valid_keys_first(jnp.asarray(ragged))
  w = jnp.asarray(np.random.default_rng(11).normal(size=(B, S, H, HD)), jnp.float32)
  for key_valid in (valid, ragged):
    kv = jnp.asarray(key_valid)

    def loss(q, k, v, impl, kv=kv):
      if impl == "xla":
        out = dot_product_attention(q, k, v, kv[:, None, None, :], uniform_rows=uniform)
      else:
        out = ak.key_padding_attention(q, k, v, kv, uniform_rows=uniform, impl=impl,
                                       cudnn_implementation="xla")
      return jnp.sum(out * w), out

    _assert_kernel_matches_xla(loss, (q, k, v), sharded, impl)


@pytest.mark.parametrize("impl", ["cudnn", "splash"])
def test_tower_routes_attention_to_the_kernels(monkeypatch, impl):
  from fusion_jax.models.text_guided import text_guided_features
  from fusion_jax.models.vision import VisionConfig, VisionTower
  cfg = VisionConfig(image_size=16, patch_size=4, hidden_size=32, intermediate_size=64,
                     num_layers=4, num_heads=4, dtype="float32", attention_impl=impl,
                     scan_layers=True)
  calls = []
  real = ak.full_attention

  def spy(q, k, v, **kw):  # the cuDNN wrapper on jax's XLA path (no GPU here), splash
    calls.append(kw.get("key_lengths") is not None)  # in interpret mode
    return real(q, k, v, **{**kw, "cudnn_implementation": "xla"})

  monkeypatch.setattr(ak, "full_attention", spy)
  tower = VisionTower(cfg)
  xla_tower = VisionTower(VisionConfig(**{**cfg.to_dict(), "attention_impl": "xla"}))
  pix = jnp.asarray(np.random.default_rng(7).normal(size=(2, 16, 16, 3)), jnp.float32)
  plain_features = lambda m, p: m.features(m.embed(p))  # noqa: E731
  params = tower.init(jax.random.key(0), pix, method=plain_features)
  calls.clear()
  plain = tower.apply(params, pix, method=plain_features)
  assert calls and not any(calls)  # tiles / plain images: every key
  np.testing.assert_allclose(plain, xla_tower.apply(params, pix, method=plain_features),
                             atol=1e-5)
  text = jnp.asarray(np.random.default_rng(8).normal(size=(2, 5, 32)), jnp.float32)
  tmask = jnp.asarray(np.arange(5)[None] < np.array([[5], [3]]))
  for mode, kernel in (("faithful", True), ("block_vision_to_text", False)):
    guided = lambda m, p, t, tm, mode=mode: text_guided_features(  # noqa: E731
        m, m.embed(p), t, tm, mode=mode)
    calls.clear()
    out = tower.apply(params, pix, text, tmask, method=guided)
    # faithful: key lengths (+ uniform early text rows); block mode's query-dependent early
    # mask keeps the XLA path in every scanned layer.
    assert bool(calls) == kernel and all(calls)
    np.testing.assert_allclose(out, xla_tower.apply(params, pix, text, tmask, method=guided),
                               atol=1e-5)
  with pytest.raises(ValueError, match="attention_impl"):
    VisionConfig(**{**cfg.to_dict(), "attention_impl": "flash"})


def test_full_attention_keeps_xla_for_head_widths_cudnn_refuses():
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 8, 2, 12)), jnp.float32) for _ in range(3))
  # cudnn_implementation='cudnn' off a GPU raises, so reaching the XLA path proves the guard.
  out = ak.full_attention(q, k, v, impl="cudnn")
  np.testing.assert_allclose(out, dot_product_attention(q, k, v), atol=1e-6)
