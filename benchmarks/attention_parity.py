r"""The decoder's attention kernels against the float32 XLA path, on the device present.

  python benchmarks/attention_parity.py [--batch 2] [--seq 1024] [--heads 32] [--kv_heads 32]
      [--head_dim 96] [--dtype bfloat16] [--impls cudnn] [--tolerance 0.02]

Random q, k, v in --dtype; row 0 holds two packed samples and padding, row 1 one sample and
padding. Each kernel runs every route it has: `mask` (segment ids: packed rows) and, for cudnn,
`lengths` (one sample per row, real tokens first: the segment ids with every sample id set to 1 and
the row's real-token count) and `packed` (the packed rows as cuDNN's packed-segment layout: tokens
per sample slot, row 1's second slot empty); for the vision tower (cudnn only), `full`: unmasked
bidirectional attention (attention_kernels.full_attention), and `keys`: the text-guided image's
rule, valid keys first and uniform rows (key_padding_attention). Prints, per kernel and route, the
largest error of the output and of the q / k / v gradients of sum(out * w) on real rows, relative
to the largest reference value, against --tolerance. Exit status 1 when one exceeds it. On a
machine without the kernel's hardware, cudnn runs its wrapper on jax's XLA path and splash in
Pallas interpret mode (tests/test_attention_kernels.py checks those at 1e-5 in fp32); on a GPU this
is the check that cuDNN itself computes the same attention (benchmarks/gpu_run.sh runs it first).
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from fusion_jax import cli
from fusion_jax.models import attention_kernels as ak

PROG = "python benchmarks/attention_parity.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_integer("batch", 2, "rows (row 0 packed, the others one sample each)",
                       flag_values=fv)
  flags.DEFINE_integer("seq", 1024, "tokens per row", flag_values=fv)
  flags.DEFINE_integer("heads", 32, "query heads", flag_values=fv)
  flags.DEFINE_integer("kv_heads", 32, "key / value heads", flag_values=fv)
  flags.DEFINE_integer("head_dim", 96, "head width (Phi-3: 96)", flag_values=fv)
  flags.DEFINE_string("dtype", "bfloat16", "q / k / v dtype", flag_values=fv)
  flags.DEFINE_list("impls", ["cudnn"], "attention_impl values to check", flag_values=fv)
  flags.DEFINE_float("tolerance", 0.02, "largest allowed error relative to the reference's "
                     "largest value", flag_values=fv)


def segments(batch: int, seq: int) -> tuple[np.ndarray, np.ndarray]:
  """(packed segment ids (B, S): row 0 two samples then padding, other rows one sample then
  padding; one-sample ids (B, S) with every sample of a row merged into segment 1)."""
  seg = np.zeros((batch, seq), np.int32)
  seg[0, :seq // 2], seg[0, seq // 2:seq - seq // 8] = 1, 2
  for b in range(1, batch):
    seg[b, :seq - (b * seq) // (4 * batch)] = 1
  return seg, (seg > 0).astype(np.int32)


def check(a) -> list[tuple[str, str, float]]:
  """[(impl, route, worst relative error)] over the output and the three gradients."""
  rng = np.random.default_rng(0)
  b, s = a.batch, a.seq
  q, k, v = (jnp.asarray(rng.normal(size=(b, s, n, a.head_dim)), a.dtype)
             for n in (a.heads, a.kv_heads, a.kv_heads))
  w = jnp.asarray(rng.normal(size=(b, s, a.heads, a.head_dim)), jnp.float32)
  on_device = {"cudnn": jax.default_backend() == "gpu", "splash": jax.default_backend() == "tpu"}
  out = []
  packed, single = segments(b, s)
  every = np.ones((b, s), np.int32)
  uniform = jnp.asarray(np.arange(s)[None] >= s - s // 8).repeat(b, axis=0)
  for route, seg in (("mask", packed), ("lengths", single), ("packed", packed),
                     ("full", every), ("keys", single)):
    seg = jnp.asarray(seg)
    real = (seg > 0)[:, :, None, None]
    lengths = {"lengths": jnp.sum(seg > 0, axis=1).astype(jnp.int32),
               "packed": ak.slot_lengths(seg, 2)}.get(route)

    def loss(q, k, v, impl, seg=seg, real=real, lengths=lengths, route=route):
      kw = {}
      if impl == "cudnn" and not on_device["cudnn"]:
        kw["cudnn_implementation"] = "xla"
      if route == "full":  # the vision tower's unmasked bidirectional attention
        o = ak.full_attention(q, k, v, impl=impl, **kw).astype(jnp.float32)
      elif route == "keys":  # the text-guided image: valid keys first, uniform text rows
        o = ak.key_padding_attention(q, k, v, seg > 0, uniform_rows=uniform, impl=impl,
                                     **kw).astype(jnp.float32)
      else:
        kw.update({} if impl == "xla" else {"lengths": lengths})
        o = ak.causal_attention(q, k, v, seg, impl=impl, **kw).astype(jnp.float32)
      o = jnp.where(real, o, 0.0)  # padding rows are read by nothing
      return jnp.sum(o * w), o

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True), static_argnums=3)
    (_, ref), gref = vg(*(x.astype(jnp.float32) for x in (q, k, v)), "xla")
    for impl in a.impls:
      if route != "mask" and impl != "cudnn":
        continue  # only cuDNN has length routes and a tower kernel
      (_, got), g = vg(q, k, v, impl)
      errs = [float(jnp.max(jnp.abs(x.astype(jnp.float32) - r)) / (jnp.max(jnp.abs(r)) + 1e-12))
              for x, r in zip((got, *g), (ref, *gref))]
      where = "device" if on_device.get(impl) else "emulated"
      print(f"{impl:6s} {route:7s} ({where}): relative error out {errs[0]:.2e}, dq {errs[1]:.2e},"
            f" dk {errs[2]:.2e}, dv {errs[3]:.2e} | {b} x {s}, heads {a.heads}/{a.kv_heads}, "
            f"head_dim {a.head_dim}, {a.dtype}, {jax.devices()[0].device_kind}", flush=True)
      out.append((impl, route, max(errs)))
  return out


def main(args) -> int:
  bad = [(i, r, e) for i, r, e in check(args) if e > args.tolerance]
  for impl, route, e in bad:
    print(f"{PROG}: {impl} {route} route differs from the XLA path by {e:.2e} > "
          f"{args.tolerance}", file=sys.stderr)
  return 1 if bad else 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
