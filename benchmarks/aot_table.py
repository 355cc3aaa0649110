r"""docs/performance.md rows from `python -m fusion_jax.aot --out` reports, with the smallest v5p
slice each config is estimated to fit.

  python benchmarks/aot_table.py /tmp/aot/fusion_3b_stage2.json ...

The estimate scales the measured per-chip peak to other chip counts the way FSDP shards it:
arguments, outputs and temporaries divide by the chip count, the generated code does not.
It is an estimate (activations that are not batch-sharded, e.g. replicated gathers, do not
shrink); compile the slice with fusion_jax.aot to be sure.
"""
from __future__ import annotations

import json
import sys

V5P_HBM_GIB = 95.0


def scaled_peak(r: dict, chips: int) -> float:
  """Per-chip peak (GiB) of report r's step estimated on `chips` chips."""
  code = r["generated_code_gib"]
  return code + (r["per_chip_peak_gib"] - code) * r["chips"] / chips


def smallest_v5p(r: dict) -> str:
  """The smallest v5p-N (N = 2 x chips) whose estimated peak fits and whose chip count
  divides the global batch."""
  chips = 1
  while chips <= 4096:
    if r["global_batch"] % chips == 0 and scaled_peak(r, chips) <= V5P_HBM_GIB:
      est = "measured" if chips == r["chips"] else f"est. {scaled_peak(r, chips):.0f} GiB"
      return f"v5p-{2 * chips} ({est})"
    chips *= 2
  return "none"


def row(r: dict) -> str:
  fits = "yes" if r["fits"] else "**no**"
  return (f"| `{r['config'].split('/')[-1]}` | {r['topology']} | {fits} | "
          f"{r['per_chip_peak_gib']:.1f} / {r['hbm_gib']:.0f} GiB | "
          f"{r['compile_s']:.0f} s / {r['compile_cpu_s']:.0f} s | "
          f"{r['generated_code_gib']:.2f} GiB | {smallest_v5p(r)} |")


if __name__ == "__main__":
  for path in sys.argv[1:]:
    with open(path) as f:
      print(row(json.load(f)))
