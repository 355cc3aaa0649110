r"""Where a TPU program's generated code goes: per-kernel bundle counts from libtpu's LLO dump.

  LIBTPU_INIT_ARGS="--xla_jf_dump_to=DIR --xla_jf_dump_llo_pass_label_regex=final_bundles" \
      python -m fusion_jax.aot --config experiments/fusion_3b.py:stage2 --topology v5p-128
  python benchmarks/llo_bundles.py DIR [--hlo FILE.hlo.txt]   # FILE from aot --hlo_out

Reads each kernel's `*schedule-analysis_final_bundles.txt` (the scheduled bundle count libtpu
reports; the program's total is the compile log's "final program bundle count") and prints the
largest kernels and the totals by kernel kind (the HLO name without its number: fusion,
scatter_fusion, all-reduce, custom-call...). With --hlo, each kernel also gets the model code it
comes from (the op_name metadata of the HLO instruction of that name). Undocumented libtpu
flags: a diagnostic, not an interface.
"""
from __future__ import annotations

import collections
import os
import re

from absl import flags

from fusion_jax import cli

PROG = "python benchmarks/llo_bundles.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("hlo", "", "the program's optimized HLO (fusion_jax.aot --hlo_out)",
                      flag_values=fv)
  flags.DEFINE_integer("top", 25, "kernels and kinds listed", flag_values=fv)


def kernel_bundles(dump_dir: str) -> dict[str, int]:
  """{kernel name: scheduled bundles} from a final_bundles LLO dump."""
  out = {}
  for f in os.listdir(dump_dir):
    if not f.endswith("schedule-analysis_final_bundles.txt"):
      continue
    with open(os.path.join(dump_dir, f), errors="replace") as fh:
      m = re.search(r"total scheduled bundles:\s+(\d+)", fh.read(2000))
    name = re.sub(r"-\d+-schedule-analysis_final_bundles\.txt$", "", re.sub(r"^\d+-", "", f))
    if m:
      out[name] = out.get(name, 0) + int(m.group(1))
  return out


def op_names(hlo_text: str) -> dict[str, str]:
  """{instruction name: op_name metadata} of an HLO module's text."""
  names = {}
  for m in re.finditer(r"^\s+(?:ROOT )?%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
    names.setdefault(m.group(1), m.group(2))
  return names


def main(a) -> int:
  bundles = kernel_bundles(a.dump_dir)
  names = op_names(open(a.hlo).read()) if a.hlo else {}
  total = sum(bundles.values())
  print(f"{len(bundles)} kernels, {total:,} bundles")
  kinds = collections.Counter()
  for k, n in bundles.items():
    kinds[re.sub(r"[.\d]+$", "", k)] += n
  print("by kind:")
  for k, n in kinds.most_common(a.top):
    print(f"  {n:>10,} {100 * n / total:5.1f} %  {k}")
  print("largest kernels:")
  for k, n in sorted(bundles.items(), key=lambda kv: -kv[1])[:a.top]:
    print(f"  {n:>10,} {100 * n / total:5.1f} %  {k}  {names.get(k, '')[:150]}")
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG, positional=("dump_dir",))
