"""The analytical FLOPs formula (fusion_jax.models.flops) against parameter counts and XLA."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from fusion_jax.models import flops, fusion
from fusion_jax.models.llm import Decoder
from fusion_jax.models.presets import FUSION_3B, TINY


def test_llm_matches_6nd_plus_attention():
  cfg, b, s = TINY.llm, 2, 32
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(
      jax.random.key(0), jnp.zeros((b, s, cfg.hidden_size)), jnp.zeros((b, s), jnp.int32),
      jnp.ones((b, s), bool)))
  leaves = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(shapes["params"]))
  # Matmul weights: every kernel (projections, MLP, LM head); not the embedding or norms.
  n = sum(x.size for path, x in leaves if "kernel" in jax.tree_util.keystr(path))
  attn = 6 * cfg.num_layers * b * s * s * cfg.num_heads * cfg.head_dim  # 3 x causal half
  got = flops.llm_train_flops(cfg, batch=b, seq_len=s, remat=False)["model"]
  assert got == pytest.approx(6 * n * b * s + attn, rel=1e-9)
  full = flops.train_step_flops(TINY, batch=b, seq_len=s, q=4, max_questions=2)
  assert full["llm_6nd"] == pytest.approx(6 * n * b * s, rel=1e-9)


def test_forward_matches_xla_cost_analysis():
  b, s, lq, q = 2, 64, 2, 4
  batch = fusion.example_batch(TINY, batch_size=b, seq_len=s, max_questions=lq, q=q)
  params = nn.meta.unbox(jax.eval_shape(lambda: fusion.init(jax.random.key(0), TINY, batch))["params"])
  compiled = jax.jit(lambda p, x: fusion.apply(p, x, TINY)[0]).lower(params, batch).compile()
  xla = compiled.cost_analysis()["flops"]
  r = flops.train_step_flops(TINY, batch=b, seq_len=s, q=q, max_questions=lq)
  # The XLA attention computes the full S x S square (the formula counts the causal half), and
  # XLA also counts elementwise ops (norms, softmax, GELU): a few % at these tiny widths.
  assert xla == pytest.approx(r["fwd_total"] + r["fwd"]["llm_attn"], rel=0.1)


def test_remat_and_shares():
  r = flops.train_step_flops(FUSION_3B, batch=1, seq_len=4096, q=64, max_questions=8)
  assert r["model"] == pytest.approx(3 * r["fwd_total"])
  assert r["hardware"] == pytest.approx(r["model"] + r["remat"])
  assert r["fwd"]["llm"] < r["remat"] < r["fwd_total"]  # decoder + tower layers, not the head
  no = flops.train_step_flops(FUSION_3B, batch=1, seq_len=4096, q=64, max_questions=8, remat=False)
  assert no["hardware"] == no["model"]
  assert 0.05 < r["fusion_share"] < 0.2  # tower + projectors + interaction at paper shapes
  packed = flops.train_step_flops(FUSION_3B, batch=1, seq_len=4096, q=64, max_questions=8,
                                  segments_per_row=2)
  assert packed["fwd"]["llm_attn"] == pytest.approx(r["fwd"]["llm_attn"] / 2)
  chunked = flops.train_step_flops(FUSION_3B, batch=1, seq_len=4096, q=64, max_questions=8,
                                   loss_chunks=8)  # the LM head's forward again, per chunk
  head = 2.0 * 4096 * FUSION_3B.llm.hidden_size * FUSION_3B.llm.vocab_size
  assert chunked["model"] == r["model"]
  assert chunked["remat"] == pytest.approx(r["remat"] + head)


def test_peak_table():
  assert flops.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("TPU v5 lite") == 197e12
  assert flops.peak_flops("TPU v5p") == 459e12
  assert flops.peak_flops("cpu") is None
