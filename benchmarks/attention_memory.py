r"""Compiled temporary memory of decoder layers' forward + backward, per attention kernel.

  python benchmarks/attention_memory.py [--preset fusion_3b] [--seq 4096] [--batch 1]
      [--layers 1] [--dtype float32] [--impls xla,splash]

Compiles (does not run) the gradient of one Decoder forward at the preset's LLM width with full
remat and prints XLA's memory analysis (temp bytes) for each LLMConfig.attention_impl. Off TPU
splash compiles in Pallas interpret mode, which still shows whether (B, H, S, S) float32 scores
are materialised; cudnn needs a GPU. The vocabulary is cut to 1024 so logits do not dominate.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
from absl import flags

from fusion_jax import cli
from fusion_jax.models.llm import Decoder
from fusion_jax.models.presets import get_preset

PROG = "python benchmarks/attention_memory.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("preset", "fusion_3b", "model preset (its LLM width)", flag_values=fv)
  flags.DEFINE_integer("seq", 4096, "tokens per row", flag_values=fv)
  flags.DEFINE_integer("batch", 1, "rows", flag_values=fv)
  flags.DEFINE_integer("layers", 1, "decoder layers", flag_values=fv)
  flags.DEFINE_string("dtype", "float32", "compute dtype", flag_values=fv)
  flags.DEFINE_list("impls", ["xla", "splash"], "LLMConfig.attention_impl values to compile",
                    flag_values=fv)


def temp_mib(a) -> dict[str, float]:
  """{attention_impl: compiled temp MiB} of one decoder forward + backward; prints each."""
  base = get_preset(a.preset).llm.replace(num_layers=a.layers, vocab_size=1024, dtype=a.dtype,
                                          rope_scaling=None, remat_policy="full")
  ids = jnp.zeros((a.batch, a.seq), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(a.seq)[None], ids.shape)
  mask = jnp.ones(ids.shape, bool)
  params = jax.eval_shape(lambda k: Decoder(base).init(k, ids, pos, mask, method=Decoder.forward),
                          jax.random.key(0))["params"]
  out = {}
  for impl in a.impls:
    cfg = base.replace(attention_impl=impl)
    grad = jax.grad(lambda p, cfg=cfg: jnp.sum(
        Decoder(cfg).apply({"params": p}, ids, pos, mask, method=Decoder.forward)[0]))
    t = time.perf_counter()
    mem = jax.jit(grad).lower(params).compile().memory_analysis()
    out[impl] = mem.temp_size_in_bytes / 2**20
    print(f"{impl}: temp {out[impl]:,.0f} MiB (compile {time.perf_counter() - t:.1f} s) — "
          f"{a.preset} LLM width, {a.layers} layer(s), {a.batch} x {a.seq}, {a.dtype}, "
          f"{jax.devices()[0].device_kind}")
  return out


def main(args) -> int:
  temp_mib(args)
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
