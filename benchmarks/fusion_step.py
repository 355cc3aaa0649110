r"""Time the FUSION forward + loss and a full train step (AdamW) for a preset, after compile.

  python benchmarks/fusion_step.py [--preset tiny] [--batch 4] [--seq 48] [--questions 2] [--q 4]
      [--steps 10] [--dtype float32]

Prints compile time and the median wall time per call on the default JAX device. Shapes are
static (an example batch from fusion.example_batch), so each measurement is one compilation.
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import flax.linen as nn
import jax
import optax
from absl import flags

from fusion_jax import cli
from fusion_jax.models import fusion
from fusion_jax.models.presets import get_preset

PROG = "python benchmarks/fusion_step.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("preset", "tiny", "model preset", flag_values=fv)
  flags.DEFINE_integer("batch", 4, "rows", flag_values=fv)
  flags.DEFINE_integer("seq", 48, "tokens per row", flag_values=fv)
  flags.DEFINE_integer("questions", 2, "question slots per sample", flag_values=fv)
  flags.DEFINE_integer("q", 4, "latents per question", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "timed calls", flag_values=fv)
  flags.DEFINE_string("dtype", "float32", "compute dtype", flag_values=fv)


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


def main(a) -> int:
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
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
