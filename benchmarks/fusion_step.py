r"""Time the FUSION forward + loss and a full train step (AdamW) for a preset, after compile.

  python benchmarks/fusion_step.py [--preset tiny] [--batch 4] [--seq 48] [--questions 2] [--q 4]
      [--steps 10] [--dtype float32]

Prints compile time and the median wall time per call on the default JAX device. Shapes are
static (an example batch from fusion.example_batch), so each measurement is one compilation.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import optax

from fusion_jax.models import fusion
from fusion_jax.models.presets import get_preset


def _time(fn, *args, steps: int) -> tuple[float, float]:
  t = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return compile_s, statistics.median(times)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--preset", default="tiny")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=48)
  p.add_argument("--questions", type=int, default=2)
  p.add_argument("--q", type=int, default=4)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--dtype", default="float32")
  a = p.parse_args()
  cfg = get_preset(a.preset)
  cfg = dataclasses.replace(cfg, llm=cfg.llm.replace(dtype=a.dtype),
                            vision=dataclasses.replace(cfg.vision, dtype=a.dtype))
  batch = fusion.example_batch(cfg, batch_size=a.batch, seq_len=a.seq, max_questions=a.questions,
                               q=a.q)
  params = nn.meta.unbox(fusion.init(jax.random.key(0), cfg, batch)["params"])
  n = sum(x.size for x in jax.tree.leaves(params))
  loss = jax.jit(lambda p, b: fusion.loss_fn(p, b, cfg)[0])
  tx = optax.adamw(1e-4)
  opt = tx.init(params)

  @jax.jit
  def step(p, o, b):
    g = jax.grad(lambda p: fusion.loss_fn(p, b, cfg)[0])(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o

  print(f"{a.preset}: {n / 1e6:.2f}M params, batch {a.batch} x {a.seq} tokens, q {a.q}, "
        f"{a.dtype}, device {jax.devices()[0].device_kind}")
  c, t = _time(loss, params, batch, steps=a.steps)
  print(f"forward + loss: compile {c:.1f} s, {t * 1e3:.1f} ms per call")
  c, t = _time(step, params, opt, batch, steps=a.steps)
  print(f"train step:     compile {c:.1f} s, {t * 1e3:.1f} ms per call")


if __name__ == "__main__":
  main()
