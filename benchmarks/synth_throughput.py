"""Throughput of the procedural synthesis engine: samples/s per core at 384 px.

  python benchmarks/synth_throughput.py [--num 1200] [--size 384] [--workers 1]

Runs the whole engine (`fusion_jax.synth.pipeline.synthesize`: describe, render, ask, filter
with pixel checks, PNG encoding, file writes, dedup / balance / split, JSON) in one process
over all categories and prints
  - samples/s per core from CPU time (robust on a shared machine: time spent waiting for the
    CPU is not counted), and from wall time (pessimistic when other jobs share the cores);
  - a per-stage breakdown (CPU ms per item) measured on a separate pass.
A "sample" is one generated item (rejected items included: their cost is paid too).
"""
from __future__ import annotations

import collections
import os
import tempfile
import time

from absl import flags

from fusion_jax import cli
from fusion_jax.synth.backends import BackendConfig
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.pipeline import SynthConfig, item_rngs, synthesize
from fusion_jax.synth.records import build_record
from fusion_jax.synth.render import encode_image

PROG = "python benchmarks/synth_throughput.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("num", 1200, "items to generate", flag_values=fv)
  flags.DEFINE_integer("size", 384, "image size (px)", flag_values=fv)
  flags.DEFINE_integer("workers", 1, "synthesis worker processes", flag_values=fv)


def stage_breakdown(size: int, n: int) -> dict[str, float]:
  """CPU ms per item for each stage (procedural backends, PNG level 1)."""
  b = BackendConfig().build()
  t = collections.Counter()
  for i in range(n):
    rngs = item_rngs(0, i)
    c0 = time.process_time()
    desc = b["describer"].describe(CATEGORIES[i % len(CATEGORIES)], rngs["describe"])
    c1 = time.process_time()
    image = b["renderer"].render(desc, size, rngs["render"])
    c2 = time.process_time()
    turns = b["asker"].ask(desc, rngs["ask"])
    c3 = time.process_time()
    b["filter"].check(desc, turns, image)
    c4 = time.process_time()
    encode_image(image)
    build_record(f"x{i}", desc.category, turns, desc.caption, "images/x.png")
    c5 = time.process_time()
    t.update({"describe": c1 - c0, "render": c2 - c1, "ask": c3 - c2, "filter": c4 - c3,
              "encode+record": c5 - c4})
  return {k: 1000 * v / n for k, v in t.items()}


def main(args) -> int:
  with tempfile.TemporaryDirectory() as d:
    cfg = SynthConfig(out=os.path.join(d, "out"), num=args.num, seed=0, size=args.size,
                      workers=args.workers, progress=False)
    c0, t0 = time.process_time(), time.perf_counter()
    stats = synthesize(cfg)
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
  gen = stats["generated"]
  print(f"synthesize: {gen} items ({stats['records']} kept) at {args.size} px, "
        f"{args.workers} worker(s)")
  if args.workers == 1:
    print(f"  per core (CPU time):  {gen / cpu:7.1f} samples/s  ({1000 * cpu / gen:.2f} ms/item)")
  print(f"  wall clock:           {gen / wall:7.1f} samples/s  "
        f"({gen / wall / args.workers:.1f} per worker)  load avg {os.getloadavg()[0]:.2f}")
  br = stage_breakdown(args.size, min(args.num, 480))
  print("  stages (CPU ms/item): " + ", ".join(f"{k} {v:.2f}" for k, v in br.items())
        + f"; sum {sum(br.values()):.2f}")
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
