"""fusion_jax.aot: the train step compiled for a Cloud TPU slice on this CPU host (libtpu).

Both runs are subprocesses of one test file: libtpu lets one process at a time hold
/tmp/libtpu_lockfile, and --dist loadfile keeps this file on one worker.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fusion_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(tmp_path, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
  out = tmp_path / "aot.json"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("XLA_FLAGS", None)  # the TPU target, not 8 virtual CPU devices
  proc = subprocess.run(
      [sys.executable, "-m", "fusion_jax.aot", "--config", "experiments/fusion_tiny.py",
       "--config.model.scan_layers=true", f"--out={out}", *flags],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  report = json.loads(out.read_text()) if out.exists() else {}
  return proc, report


def test_topology_names():
  gen, chips, desc = aot.parse_topology("v5p-128")
  assert (chips, desc, gen.hbm_gib) == (64, "v5p:4x4x4", 95.0)
  assert aot.parse_topology("v5e-256")[1:] == (256, "v5e:16x16")
  assert aot.parse_topology("v6e-64")[1:] == (64, "v6e:8x8")
  assert aot.parse_topology("v5p-8")[1:] == (4, "v5p:2x2x1")
  with pytest.raises(ValueError, match="GEN-N"):
    aot.parse_topology("h100-8")
  with pytest.raises(ValueError, match="TensorCores"):
    aot.parse_topology("v5p-7")


def test_hlo_stats_counts_computations_and_source_ops():
  import jax
  import jax.numpy as jnp

  def loss(w, x):  # a scanned 3-layer stack, its gradient: forward and backward while loops
    return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

  text = jax.jit(jax.grad(loss)).lower(jnp.ones((3, 8, 8)), jnp.ones((4, 8))).compile().as_text()
  s = aot.hlo_stats(text, top=3)
  assert s["opcodes"]["while"] == 2 and s["opcodes"]["dot"] >= 2 and s["opcodes"]["tanh"] >= 1
  assert sum(s["opcodes"].values()) == s["instructions"]
  sizes = [c["instructions"] for c in s["largest"]]
  assert len(sizes) == 3 and sizes == sorted(sizes, reverse=True)
  assert any("while" in c["top_op_name"] for c in s["largest"])


def test_tiny_fits_and_too_large_batch_does_not(tmp_path):
  hlo = tmp_path / "step.hlo.txt"
  proc, r = _aot(tmp_path, "--topology=v5p-8", f"--hlo_out={hlo}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = hlo.read_text()
  # 'auto' attention compiles for the target (splash, a Mosaic kernel), not the host's XLA path.
  assert text.startswith("HloModule ") and 'custom_call_target="tpu_custom_call"' in text
  stats = r["hlo_stats"]
  assert stats["instructions"] > stats["computations"] > 1 and stats["opcodes"]["while"] >= 2
  for key in ("compile_s", "per_chip_peak_gib", "hbm_gib", "fits", "flops_per_step",
              "model_flops_per_step", "topology", "mesh", "generated_code_gib"):
    assert key in r, key
  assert r["fits"] and r["hbm_gib"] == 95.0 and r["topology"] == "v5p-8"
  assert r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert 0 < r["per_chip_peak_gib"] < 1 and r["model_flops_per_step"] > 0
  assert "fits" in proc.stdout and "peak" in proc.stdout

  # (8192 rows x 2048 tokens x 320 vocab) float32 logits alone are ~5 GiB per v5e chip.
  proc, r = _aot(tmp_path, "--topology=v5e-4", "--config.global_batch=8192",
                 "--config.data.seq_len=2048")
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert r["fits"] is False and r["per_chip_peak_gib"] > r["hbm_gib"] == 16.0
  assert "does not fit" in proc.stderr and "microbatches" in proc.stderr
