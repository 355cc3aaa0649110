"""What one accelerator can do: its dense bf16 peak FLOP/s (the MFU denominator).

Read by the trainer's MFU log (fusion_jax/train/config.py: peak_flops_per_device), the MFU
benchmark and the AOT report (through fusion_jax.models.flops). Values are the vendors' data
sheets, without sparsity.
"""
from __future__ import annotations

# Dense bf16 peak per chip (TFLOP/s), matched in order as a case-insensitive substring of
# jax's device_kind ("TPU v5 lite" is v5e; "H100 PCIe" before the SXM "H100").
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("TPU v6", 918.0), ("TPU v5p", 459.0), ("TPU v5 lite", 197.0), ("TPU v5e", 197.0),
    ("TPU v5", 459.0), ("TPU v4", 275.0), ("H200", 989.0), ("H100 PCIe", 756.0),
    ("H100", 989.0), ("A100", 312.0), ("L4", 121.0),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one chip named by jax's `device_kind`; None when unknown (CPU)."""
  kind = device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key.lower() in kind:
      return tflops * 1e12
  return None
