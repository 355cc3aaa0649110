"""Numerical check of an imported transformers checkpoint against transformers itself.

  python -m fusion_jax.convert.compare_hf DIR [--seq 64] [--atol 1e-4] [--batch 2] [--seed 0]

Runs DIR with transformers (CPU, float32, eager attention) and with fusion_jax (float32) on
the same random inputs and prints the largest absolute difference:
  LLM (Llama / Phi-3): logits at every real token of a batch whose last example is
    right-padded (so the padding mask is exercised too);
  SigLIP: every hidden state (hs[0] = embeddings, hs[i] = layer i) and the post-layernorm
    last_hidden_state.
Exits 1 when a difference exceeds --atol, 2 when DIR cannot be read, 0 otherwise. The torch
model is dropped before the JAX one is built, so peak memory is one model plus the outputs.
"""
from __future__ import annotations

import gc
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import flags

from fusion_jax import cli
from fusion_jax.convert.hf import SUPPORTED, hf_architecture, load_hf_dir, read_config


def _lengths(batch: int, seq: int) -> np.ndarray:
  """Example 0 full length, the last one right-padded by a quarter (at least one token)."""
  lengths = np.full((batch,), seq, np.int32)
  if batch > 1:
    lengths[-1] = max(1, seq - seq // 4)
  return lengths


def compare_llm(directory: str, arch: str, seq: int, batch: int, seed: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from fusion_jax.models.llm import Decoder, rope_tables
  from fusion_jax.models.rope import longrope_is_long

  rng = np.random.default_rng(seed)
  hf_cfg = read_config(directory)
  vocab = int(hf_cfg["vocab_size"])
  ids = rng.integers(0, vocab, size=(batch, seq), dtype=np.int64)
  lengths = _lengths(batch, seq)
  mask = np.arange(seq)[None, :] < lengths[:, None]

  cls = getattr(transformers, arch)
  model = cls.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask.astype(np.int64))).logits.float().numpy()
  del model
  gc.collect()

  kind, cfg, params = load_hf_dir(directory, weights_dtype=np.float32,
                                   overrides={"dtype": "float32"})
  positions = np.where(mask, np.arange(seq)[None, :], 0).astype(np.int32)
  with jax.default_matmul_precision("highest"):
    out, _ = jax.jit(lambda p, i, pos, m: Decoder(cfg).apply(
        {"params": p}, i, pos, m, method=Decoder.forward))(
            params, jnp.asarray(ids, jnp.int32), jnp.asarray(positions), jnp.asarray(mask))
  out = np.asarray(out)
  diff = np.abs(out - ref)[mask]
  tables = rope_tables(cfg)
  if tables.switch_at is not None:
    regime = "long" if longrope_is_long(tables, int(positions.max())) else "short"
    rope = (f"longrope, {regime} factors (max position {int(positions.max())} + 1 vs original "
            f"{tables.switch_at}), attention factor {tables.scale:.4f}")
  elif cfg.rope_scaling is not None:
    rope = f"{cfg.rope_scaling.rope_type}, theta {cfg.rope_theta:g}"
  else:
    rope = f"default, theta {cfg.rope_theta:g}"
  return {
      "model": (f"{arch} (arch {cfg.arch}, {cfg.num_layers} layers, D {cfg.hidden_size}, heads "
                f"{cfg.num_heads}/{cfg.num_kv_heads}, vocab {cfg.vocab_size})"),
      "rope": rope,
      "inputs": f"batch {batch}, seq {seq}, lengths {lengths.tolist()}, seed {seed}",
      "diffs": {"logits": float(diff.max())},
      "detail": (f"mean |diff| {float(diff.mean()):.2e}, max |logit| "
                 f"{float(np.abs(ref[mask]).max()):.3g}"),
  }


def compare_siglip(directory: str, arch: str, batch: int, seed: int) -> dict[str, Any]:
  import jax
  import jax.numpy as jnp
  import torch
  import transformers

  from fusion_jax.models.vision import VisionTower

  hf_cfg = read_config(directory)
  vcfg = hf_cfg["vision_config"] if arch == "SiglipModel" else hf_cfg
  size = int(vcfg.get("image_size", 224))
  rng = np.random.default_rng(seed)
  pixels = rng.uniform(-1.0, 1.0, size=(batch, 3, size, size)).astype(np.float32)

  model = getattr(transformers, arch).from_pretrained(
      directory, dtype=torch.float32, attn_implementation="eager").eval()
  tower = model.vision_model if arch == "SiglipModel" else model
  with torch.no_grad():
    out = tower(pixel_values=torch.from_numpy(pixels), output_hidden_states=True)
  ref_hs = [h.float().numpy() for h in out.hidden_states]
  ref_last = out.last_hidden_state.float().numpy()
  del model, tower, out
  gc.collect()

  kind, cfg, params = load_hf_dir(directory, weights_dtype=np.float32,
                                   overrides={"dtype": "float32"})
  nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))

  def run(p, x):
    m = VisionTower(cfg)
    hs = m.apply({"params": p}, x)
    return hs, m.apply({"params": p}, hs[-1], method=VisionTower.post_norm)

  with jax.default_matmul_precision("highest"):
    hs, last = jax.jit(run)(params, nhwc)
  if len(hs) != len(ref_hs):
    raise ValueError(f"compare_hf: fusion_jax gave {len(hs)} hidden states, transformers "
                     f"{len(ref_hs)}")
  diffs = {f"hs[{i}]": float(np.abs(np.asarray(a) - b).max()) for i, (a, b) in enumerate(zip(hs, ref_hs))}
  diffs["last_hidden_state"] = float(np.abs(np.asarray(last) - ref_last).max())
  return {
      "model": (f"{arch} ({cfg.num_layers} layers, Dv {cfg.hidden_size}, heads {cfg.num_heads}, "
                f"image {cfg.image_size}, patch {cfg.patch_size})"),
      "inputs": f"batch {batch}, uniform pixels in [-1, 1], seed {seed}",
      "diffs": diffs,
      "detail": f"max |hidden| {max(float(np.abs(h).max()) for h in ref_hs):.3g}",
  }


def compare(directory: str, seq: int = 64, batch: int = 2, seed: int = 0) -> dict[str, Any]:
  """Runs the comparison; returns the report dict (diffs: name -> max abs difference)."""
  arch = hf_architecture(read_config(directory), directory)
  if SUPPORTED[arch][0] == "llm":
    return compare_llm(directory, arch, seq, batch, seed)
  return compare_siglip(directory, arch, batch, seed)


PROG = "python -m fusion_jax.convert.compare_hf"
POSITIONAL = ("directory",)  # DIR: the transformers checkpoint directory


def define_flags(fv: flags.FlagValues) -> None:
  """Flags of the command line (fusion_jax.cli); positional DIR."""
  flags.DEFINE_integer("seq", 64, "LLM sequence length", flag_values=fv)
  flags.DEFINE_float("atol", 1e-4, "max abs difference", flag_values=fv)
  flags.DEFINE_integer("batch", 2, "examples per input batch", flag_values=fv)
  flags.DEFINE_integer("seed", 0, "seed of the random inputs", flag_values=fv)


def _run(args) -> int:
  try:
    report = compare(args.directory, seq=args.seq, batch=args.batch, seed=args.seed)
  except (FileNotFoundError, ValueError, KeyError) as e:  # not a checkpoint we can compare
    print(f"compare_hf: error: {e}", file=sys.stderr)
    return 2
  worst = max(report["diffs"].values())
  ok = bool(np.isfinite(worst) and worst <= args.atol)
  print(f"compare_hf: {args.directory}")
  print(f"  model   {report['model']}")
  if "rope" in report:
    print(f"  rope    {report['rope']}")
  print(f"  inputs  {report['inputs']}")
  for name, d in report["diffs"].items():
    flag = "" if d <= args.atol else "   <-- above tolerance"
    print(f"  max |diff| {name:<18} {d:.3e}{flag}")
  print(f"  ({report['detail']})")
  print(f"  result  {'PASS' if ok else 'FAIL'} (worst {worst:.3e}, atol {args.atol:g})")
  return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
  """The command line in process: argv as typed after the program name."""
  return _run(cli.parse(define_flags, argv, PROG, POSITIONAL))


if __name__ == "__main__":
  cli.app_main(define_flags, _run, PROG, POSITIONAL)
