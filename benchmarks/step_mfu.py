r"""FUSION train-step speed and MFU at paper width, next to the PyTorch baseline on the same device.

  python benchmarks/step_mfu.py [--preset fusion_3b] [--layers 32] [--vision-layers 26]
      [--batch 2] [--seq 4096] [--q 64] [--questions 4] [--packed 4] [--attention auto]
      [--vision-attention auto]
      [--dtype bfloat16] [--remat full] [--loss-chunks 1] [--vocab-pad 0] [--noscan]
      [--steps 10] [--notorch] [--isolate]
      [--out step_mfu.json] [--profile DIR] [--hlo DIR]
  python benchmarks/step_mfu.py --tiny      # CPU smoke at tiny shapes (tests/test_step_mfu.py)

FUSION: one jitted train step (fusion.loss_fn, AdamW) in bf16 compute with fp32 params, remat
of the decoder and tower layers by --remat (default full), scanned stacks, decoder attention
by --attention (fusion_jax.models.attention_kernels), the LM head and cross entropy in
--loss-chunks token chunks (config.loss_chunks; 1 = whole logits) with the head's width padded
to a multiple of --vocab-pad (0: the trainer's, 128 on GPU and TPU; 1 = unpadded). Rows are
filled with real tokens (so tokens/s counts real tokens); `--packed P` also times rows of P
samples of S/P tokens each (segment ids, P images per row), when the model in this tree
consumes packed batches (else that row says why not). Baseline: transformers'
Phi3ForCausalLM, randomly initialised at the same width and depth (Phi3Config from the same
LLMConfig: the same vocabulary, unpadded), SDPA attention, bf16 autocast with fp32 params, gradient
checkpointing, torch AdamW, the same batch x seq tokens per step.

FLOPs are analytical, from fusion_jax.models.flops (the formula the AOT report uses): MFU =
model FLOPs (fwd + bwd) / step time / peak; HFU adds the remat recompute. Peak per chip from the
same module (None on CPU: no MFU). With fewer --layers than the preset (one device's memory),
the table says so. `--isolate` runs each framework in its own process (GPU: JAX and torch would
otherwise hold each other's memory); benchmarks/gpu_run.sh sets it. `--profile DIR` traces two
more steps of each FUSION run (jax.profiler, perfetto) and prints the accelerator's time per
step by kernel class (matmuls, attention forward / backward, the rest), by part of the model
(tower, LLM, interaction layers, projectors, loss and optimizer: each kernel's HLO instruction's
op_name; cuBLAS / cuDNN kernels count only where the trace names their instruction) and the
slowest kernels by name; `--hlo DIR` writes each run's compiled HLO, which names those kernels'
fusions.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np
from absl import flags

from fusion_jax import cli

PROG = "python benchmarks/step_mfu.py"
TINY_ARGS = ["--preset", "tiny", "--batch", "2", "--seq", "64", "--q", "4", "--questions", "2",
             "--packed", "2", "--steps", "2"]


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("preset", "fusion_3b", "model preset", flag_values=fv)
  flags.DEFINE_integer("layers", 0, "LLM layers (0 = the preset's)", flag_values=fv)
  flags.DEFINE_integer("vision-layers", 0, "tower layers (0 = the preset's)", flag_values=fv)
  flags.DEFINE_integer("batch", 2, "rows per step", flag_values=fv)
  flags.DEFINE_integer("seq", 4096, "tokens per row", flag_values=fv)
  flags.DEFINE_integer("q", 64, "latents per question", flag_values=fv)
  flags.DEFINE_integer("questions", 4, "question slots per sample (Lq)", flag_values=fv)
  flags.DEFINE_integer("packed", 4, "samples per packed row (0 = no packed run)", flag_values=fv)
  flags.DEFINE_string("attention", "auto", "LLMConfig.attention_impl", flag_values=fv)
  flags.DEFINE_string("vision-attention", "auto", "VisionConfig.attention_impl (the tower's "
                      "attention: tiles and the text-guided image)", flag_values=fv)
  flags.DEFINE_string("dtype", "bfloat16", "compute dtype", flag_values=fv)
  from fusion_jax.parallel.remat import POLICY_NAMES
  flags.DEFINE_enum("remat", "full", POLICY_NAMES,
                    "named remat policy of the decoder and tower layers (fusion_jax.parallel.remat;"
                    " HFU is reported for full and none only)", flag_values=fv)
  flags.DEFINE_integer("loss-chunks", 1, "token chunks of the LM head + cross entropy "
                       "(config.loss_chunks; 1 = the whole (B, S, V) logits)", flag_values=fv)
  flags.DEFINE_integer("vocab-pad", 0, "the loss's LM head width padded to a multiple of this "
                       "(0: the trainer's, fusion_jax.models.lm_head.loss_vocab_pad; 1 = unpadded)",
                       flag_values=fv)
  flags.DEFINE_boolean("scan", True, "scanned layer stacks (--noscan: unrolled)", flag_values=fv)
  flags.DEFINE_integer("steps", 10, "timed steps per run", flag_values=fv)
  flags.DEFINE_boolean("torch", True, "also time the PyTorch baseline (--notorch: FUSION only)",
                       flag_values=fv)
  flags.DEFINE_boolean("isolate", False, "each framework in its own process", flag_values=fv)
  flags.DEFINE_enum("part", "all", ("all", "jax", "torch"),
                    "internal: the part an --isolate subprocess runs", flag_values=fv)
  flags.DEFINE_boolean("tiny", False, "CPU smoke shapes: " + " ".join(TINY_ARGS)
                       + " (flags given with it win)", flag_values=fv)
  flags.DEFINE_string("out", "", "also write the report as JSON here", flag_values=fv)
  flags.DEFINE_string("profile", "", "trace 2 more steps of each FUSION run under this folder "
                      "and print the accelerator time by kernel class", flag_values=fv)
  flags.DEFINE_string("hlo", "", "write each FUSION run's compiled HLO here (RUN.hlo.txt.gz)",
                      flag_values=fv)


def with_tiny(argv: list[str]) -> list[str]:
  """argv with TINY_ARGS in front when it has --tiny (explicit flags still win: absl keeps a
  flag's last value)."""
  argv = list(argv)
  return TINY_ARGS + argv if "--tiny" in argv else argv


def parse_args(argv: list[str] | None = None):
  """The flags' values (argv: the arguments without the program name; None: sys.argv[1:])."""
  return cli.parse(define_flags, with_tiny(sys.argv[1:] if argv is None else argv), PROG)


def flag_argv(a) -> list[str]:
  """The shape and model flags of `a` as arguments (what an --isolate subprocess gets)."""
  return [f"--preset={a.preset}", f"--layers={a.layers}", f"--vision-layers={a.vision_layers}",
          f"--batch={a.batch}", f"--seq={a.seq}", f"--q={a.q}", f"--questions={a.questions}",
          f"--packed={a.packed}", f"--attention={a.attention}",
          f"--vision-attention={a.vision_attention}", f"--dtype={a.dtype}",
          f"--remat={a.remat}", f"--loss-chunks={a.loss_chunks}", f"--vocab-pad={a.vocab_pad}",
          "--scan" if a.scan else "--noscan", f"--steps={a.steps}",
          f"--profile={a.profile}", f"--hlo={a.hlo}"]


# ------------------------------------------------------------------------------------ configs


def model_config(a):
  from fusion_jax.models.presets import get_preset
  cfg = get_preset(a.preset)
  llm = cfg.llm.replace(num_layers=a.layers or cfg.llm.num_layers, dtype=a.dtype,
                        remat_policy=a.remat, scan_layers=a.scan,
                        attention_impl=a.attention)
  vision = dataclasses.replace(cfg.vision, num_layers=a.vision_layers or cfg.vision.num_layers,
                               dtype=a.dtype, remat_policy=a.remat, scan_layers=a.scan,
                               attention_impl=a.vision_attention)
  return cfg.replace(llm=llm, vision=vision)


def _fill_rows(batch: dict[str, np.ndarray], vocab: int, rng: np.random.Generator) -> None:
  """Extends every row's last sample with supervised text up to the row end (in place)."""
  mask = batch["token_mask"]
  for i in range(mask.shape[0]):
    n = int(mask[i].sum())
    s = mask.shape[1]
    ids = rng.integers(1, vocab, s - n).astype(np.int32)
    mask[i, n:] = True
    batch["positions"][i, n:] = np.arange(n, s)
    batch["input_ids"][i, n:] = ids
    batch["labels"][i, n:] = ids
  if "segment_ids" in batch:
    batch["segment_ids"][:] = np.where(mask, np.maximum(batch["segment_ids"], 1), 0)


def unpacked_batch(cfg, *, batch: int, seq: int, lq: int, q: int) -> dict[str, np.ndarray]:
  """fusion.example_batch (one sample per row, even rows with an image) filled to full rows."""
  from fusion_jax.models import fusion
  out = fusion.example_batch(cfg, batch_size=batch, seq_len=seq, max_questions=lq, q=q)
  _fill_rows(out, cfg.llm.vocab_size, np.random.default_rng(1))
  return out


def packed_batch(cfg, *, batch: int, seq: int, lq: int, q: int, samples: int
                 ) -> dict[str, np.ndarray]:
  """`samples` image samples of seq // samples tokens per row (batch_spec.pack_examples)."""
  from fusion_jax.models import batch_spec, fusion
  sub = seq // samples
  one = fusion.example_batch(cfg, batch_size=1, seq_len=sub, max_questions=lq, q=q, seed=2)
  _fill_rows(one, cfg.llm.vocab_size, np.random.default_rng(2))
  # One example: drop the row axis (and a samples axis, if example_batch has one).
  ex = {}
  for k in batch_spec.EXAMPLE_KEYS + ("images",):
    if k in one:
      x = one[k][0]
      if "P" in batch_spec.SPEC[k].shape and x.ndim == len(batch_spec.SPEC[k].shape) - 1:
        x = x[0]
      ex[k] = x
  return batch_spec.pack_examples([[ex] * samples] * batch, seq_len=seq,
                                  samples_per_row=samples, pad_id=cfg.llm.pad_token_id)


# ------------------------------------------------------------------------------------ timing


def _scores_in_hlo(hlo: str, seq: int) -> bool:
  """A float32 tensor ending in (S, S) (materialised attention scores) in the compiled step."""
  return re.search(rf"f32\[[\d,]*\b{seq},{seq}\]", hlo) is not None


def build_step(cfg, batch: dict[str, np.ndarray], loss_chunks: int = 1, vocab_pad: int = 0):
  """(compiled AdamW train step, params, opt state, device batch, compile seconds) on the
  default device; the step maps (params, opt, batch) -> (params, opt, loss), donating both."""
  import flax.linen as nn
  import jax
  import optax

  from fusion_jax.models import fusion
  dev_batch = jax.device_put(batch)
  params = jax.jit(lambda k: nn.meta.unbox(fusion.init(k, cfg, dev_batch)["params"]))(
      jax.random.key(0))
  tx = optax.adamw(1e-5, weight_decay=0.0)
  opt = jax.jit(tx.init)(params)

  def step(p, o, b):
    (loss, _), g = jax.value_and_grad(
        lambda p: fusion.loss_fn(p, b, cfg, loss_chunks=loss_chunks, vocab_pad=vocab_pad or None),
        has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss

  t = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt, dev_batch).compile()
  return compiled, params, opt, dev_batch, time.perf_counter() - t


def time_jax(cfg, batch: dict[str, np.ndarray], steps: int, profile_dir: str = "",
             hlo_path: str = "", loss_chunks: int = 1, vocab_pad: int = 0) -> dict[str, Any]:
  """Compile + median step time of a FUSION AdamW train step on the default device; with
  `profile_dir`, two more steps are traced there and summarised by kernel class (and the
  slowest kernels by name); with `hlo_path`, the compiled HLO text is written there (gzip)."""
  import jax
  compiled, params, opt, dev_batch, compile_s = build_step(cfg, batch, loss_chunks, vocab_pad)
  hlo = compiled.as_text()
  scores = _scores_in_hlo(hlo, batch["input_ids"].shape[1])
  params, opt, loss = compiled(params, opt, dev_batch)  # warm-up
  loss.block_until_ready()
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    params, opt, loss = compiled(params, opt, dev_batch)
    loss.block_until_ready()
    times.append(time.perf_counter() - t)
  out = dict(step_s=statistics.median(times), compile_s=compile_s, loss=float(loss),
             f32_scores_in_hlo=scores, device=jax.devices()[0].device_kind,
             devices=1, real_tokens=int(np.sum(batch["token_mask"])))
  if profile_dir:
    with jax.profiler.trace(profile_dir, create_perfetto_trace=True):
      for _ in range(PROFILE_STEPS):
        params, opt, loss = compiled(params, opt, dev_batch)
      loss.block_until_ready()
    events = trace_events(profile_dir)
    out["kernel_ms_per_step"] = events_breakdown(events, PROFILE_STEPS)
    out["top_kernels"] = (top_kernels(events, PROFILE_STEPS, n=300)
                          if out["kernel_ms_per_step"] else [])
    if out["top_kernels"]:
      out["kernel_ms_by_part"] = part_breakdown(out["top_kernels"], hlo_op_names(hlo))
  if hlo_path:  # the optimized module, to map the profile's fusion names to their HLO
    import gzip
    os.makedirs(os.path.dirname(os.path.abspath(hlo_path)), exist_ok=True)
    with gzip.open(hlo_path, "wt") as f:
      f.write(hlo)
  return out


# ------------------------------------------------------------------------------------ profile

PROFILE_STEPS = 2
# Accelerator kernels by class, first match wins (cuDNN / XLA / cuBLAS kernel names).
KERNEL_CLASSES = (("attention backward", r"(cudnn|flash|fmha|sdpa).*(bprop|bwd|backward)"),
                  ("attention forward", r"cudnn|flash|fmha|sdpa"),
                  ("matmul", r"gemm|nvjet|cublas|cutlass|matmul|wgmma"),
                  ("other (elementwise, norms, copies)", r""))


def kernel_class(name: str) -> str:
  """KERNEL_CLASSES' class of one kernel name."""
  return next(c for c, rx in KERNEL_CLASSES if re.search(rx, name, re.I))


def trace_events(profile_dir: str) -> list[dict[str, Any]]:
  """The Chrome-trace events of the newest perfetto trace under `profile_dir` ([] if none)."""
  import glob
  import gzip
  paths = sorted(glob.glob(os.path.join(profile_dir, "**", "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  if not paths:
    return []
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def device_kernels(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The kernel events on the accelerator's compute streams."""
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  threads = {(e["pid"], e.get("tid")): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
  return [e for e in events if e.get("ph") == "X" and "GPU" in procs.get(e.get("pid"), "")
          and "Compute" in threads.get((e["pid"], e.get("tid")), "")]


def events_breakdown(events: list[dict[str, Any]], steps: int) -> dict[str, float] | None:
  """Milliseconds per step by kernel class on the accelerator's compute streams (plus 'busy'
  and 'span'); None when the events hold no accelerator kernels (CPU)."""
  kernels = device_kernels(events)
  if not kernels:
    return None
  out = {c: 0.0 for c, _ in KERNEL_CLASSES}
  for e in kernels:
    out[kernel_class(e["name"])] += e["dur"] / 1e3 / steps
  out["busy"] = sum(e["dur"] for e in kernels) / 1e3 / steps
  out["span"] = (max(e["ts"] + e["dur"] for e in kernels)
                 - min(e["ts"] for e in kernels)) / 1e3 / steps
  return out


def top_kernels(events: list[dict[str, Any]], steps: int, n: int = 25) -> list[dict[str, Any]]:
  """The `n` kernels (by name: one XLA fusion, e.g. of a scanned layer body, sums its calls)
  with the most accelerator time: name, class, ms and calls per step, slowest first."""
  by_name: dict[str, list[float]] = {}
  hlo_op = {}  # the profiler's annotation of a kernel with its HLO instruction, where present
  for e in device_kernels(events):
    t = by_name.setdefault(e["name"], [0.0, 0])
    t[0] += e["dur"] / 1e3 / steps
    t[1] += 1 / steps
    hlo_op.setdefault(e["name"], (e.get("args") or {}).get("hlo_op"))
  rows = sorted(by_name.items(), key=lambda kv: (-kv[1][0], kv[0]))[:n]
  return [dict(name=k, kernel_class=kernel_class(k), ms=round(ms, 3), calls=round(c, 2),
               hlo_op=hlo_op.get(k)) for k, (ms, c) in rows]


# Parts of the step by the op_name metadata of a kernel's HLO instruction; first match wins.
PARTS = (("interaction layers", r"/block/"), ("tower", r"vision_tower"),
         ("projectors", r"projector"), ("llm", r"(^|/)llm[./]"),
         ("loss, optimizer, glue", r""))


def hlo_op_names(hlo: str) -> dict[str, str]:
  """{instruction name: op_name metadata} of a compiled module's HLO text."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name=\"([^\"]*)\"", hlo, re.M):
    out.setdefault(m.group(1), m.group(2))
  return out


def part_breakdown(kernels: list[dict[str, Any]], op_names: dict[str, str]
                   ) -> dict[str, float]:
  """ms per step by part of the model (PARTS) of `top_kernels` rows: a kernel's HLO
  instruction is its `hlo_op`, else its name read as a fusion's ('loop_add_fusion_3' ->
  'loop_add_fusion.3'; what attributes kernels that run inside a CUDA command buffer, whose
  `hlo_op` is the buffer's); kernels with none of them in `op_names` (cuBLAS / cuDNN kernels
  without an annotation, copies) are 'unattributed'."""
  out: dict[str, float] = {}
  for k in kernels:
    names = (k.get("hlo_op"), re.sub(r"_(\d+)$", r".\1", k["name"]), k["name"])
    op = next((op_names[n] for n in names if n in op_names), None)
    part = ("unattributed" if op is None else
            next(name for name, rx in PARTS if re.search(rx, op)))
    out[part] = round(out.get(part, 0.0) + k["ms"], 3)
  return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def time_torch(llm_cfg, *, batch: int, seq: int, steps: int) -> dict[str, Any]:
  """Median step time of transformers' Phi3ForCausalLM (SDPA, bf16 autocast, gradient
  checkpointing, AdamW) at the LLM config's width and depth."""
  import torch
  from transformers import Phi3Config, Phi3ForCausalLM
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  hf = llm_cfg.replace(arch="phi3", rope_scaling=None).to_hf()
  hf.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
  torch.manual_seed(0)
  with device:  # initialised on the device: a 3.8B model's CPU init alone takes minutes
    model = Phi3ForCausalLM._from_config(Phi3Config(**hf), attn_implementation="sdpa")
  if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
    model.activation_checkpointing_enable()
  else:
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0,
                          fused=device.type == "cuda")
  ids = torch.randint(1, llm_cfg.vocab_size, (batch, seq), device=device)

  def step() -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())  # synchronises

  step()  # warm-up (kernel selection, optimizer state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - t)
  name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
  return dict(step_s=statistics.median(times), loss=loss, device=name, devices=1,
              real_tokens=batch * seq, torch=torch.__version__)


# ------------------------------------------------------------------------------------ report


def figures(run: dict[str, Any], fl: dict[str, float], tokens: int) -> dict[str, Any]:
  """tokens/s, TFLOP/s per device, MFU and HFU of one timed run."""
  from fusion_jax.models import flops
  s, n = run["step_s"], run["devices"]
  peak = flops.peak_flops(run["device"])
  hw = None if fl["remat"] is None else fl["model"] + fl["remat"]
  tflops = fl["model"] / s / n / 1e12
  out = dict(run, tokens_per_s=tokens / s, real_tokens_per_s=run["real_tokens"] / s,
             model_tflop=fl["model"] / 1e12, hardware_tflop=None if hw is None else hw / 1e12,
             tflops_per_device=tflops, peak_tflops=None if peak is None else peak / 1e12,
             mfu=None if peak is None else tflops * 1e12 / peak,
             hfu=None if peak is None or hw is None else hw / s / n / peak)
  return out


def _fmt(x: Any, spec: str) -> str:
  return "n/a" if x is None else format(x, spec)


def table(report: dict[str, Any]) -> str:
  cols = ("run", "device", "step s", "tokens/s", "TFLOP/s/dev", "MFU", "HFU", "f32 SxS")
  lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
  for name, r in report["runs"].items():
    if "skipped" in r:
      lines.append(f"{name} | not run: {r['skipped']}" + " |" * (len(cols) - 2))
      continue
    lines.append(" | ".join([
        name, r["device"], _fmt(r["step_s"], ".3f"), _fmt(r["tokens_per_s"], ",.0f"),
        _fmt(r["tflops_per_device"], ".1f"), _fmt(r["mfu"], ".1%"), _fmt(r["hfu"], ".1%"),
        {True: "yes", False: "no"}.get(r.get("f32_scores_in_hlo"), "-")]))
  return "\n".join(lines)


def kernels_line(name: str, ms: dict[str, float]) -> str:
  """One line: a run's accelerator milliseconds per step by kernel class."""
  parts = sorted(((v, c) for c, v in ms.items() if c not in ("busy", "span")),
                 key=lambda vc: (-vc[0], vc[1]))
  return (f"{name}, kernels per step: " + ", ".join(f"{c} {v:.1f} ms" for v, c in parts)
          + f" (busy {ms['busy']:.1f} of {ms['span']:.1f} ms)")


def _trace_dir(a, run: str) -> str:
  return os.path.join(a.profile, run) if a.profile else ""


def _hlo_path(a, run: str) -> str:
  return os.path.join(a.hlo, f"{run}.hlo.txt.gz") if a.hlo else ""


def _run_part(a, part: str) -> dict[str, Any]:
  """This script's `part` in a fresh process (its own device memory); its runs dict."""
  import tempfile
  with tempfile.TemporaryDirectory() as d:
    out = os.path.join(d, "part.json")
    cmd = [sys.executable, os.path.abspath(__file__), *flag_argv(a), "--part", part, "--out", out]
    proc = subprocess.run(cmd, check=False)
    if proc.returncode:
      return {f"{part} (all)": {"skipped": f"subprocess exited {proc.returncode}"}}
    with open(out) as f:
      return json.load(f)["runs"]


def step_flops(a, cfg) -> dict[str, dict[str, Any]]:
  """fusion_jax.models.flops.train_step_flops of the unpacked (and packed) runs; 'remat' is
  None under a partial remat policy (it recomputes an unknown share)."""
  from fusion_jax.models import flops
  shapes = dict(batch=a.batch, seq_len=a.seq, q=a.q, remat=a.remat != "none",
                loss_chunks=a.loss_chunks)
  fl = {"unpacked": flops.train_step_flops(cfg, max_questions=a.questions, **shapes)}
  if a.packed:
    fl["packed"] = flops.train_step_flops(cfg, max_questions=a.packed * a.questions,
                                          images_per_row=a.packed, segments_per_row=a.packed,
                                          **shapes)
  if a.remat not in ("full", "none"):
    for v in fl.values():
      v["remat"] = None
  return fl


def measure(a) -> dict[str, Any]:
  """Times the runs `a` asks for; prints the table (part 'all') and returns the report."""
  from fusion_jax.models import flops
  from fusion_jax.models.lm_head import loss_vocab_pad
  from fusion_jax.models.presets import get_preset
  cfg = model_config(a)
  full_depth = get_preset(a.preset).llm.num_layers
  fl = step_flops(a, cfg)
  torch_fl = flops.llm_train_flops(cfg.llm, batch=a.batch, seq_len=a.seq)
  tokens = a.batch * a.seq
  runs: dict[str, Any] = {}

  if a.isolate and a.part == "all":
    runs.update(_run_part(a, "jax"))
    if a.torch:
      runs.update(_run_part(a, "torch"))
  else:
    if a.part in ("all", "jax"):
      b = unpacked_batch(cfg, batch=a.batch, seq=a.seq, lq=a.questions, q=a.q)
      runs["fusion unpacked"] = figures(time_jax(cfg, b, a.steps, _trace_dir(a, "unpacked"),
                                                 _hlo_path(a, "unpacked"), a.loss_chunks,
                                                 a.vocab_pad),
                                        fl["unpacked"], tokens)
      if a.packed:
        try:
          b = packed_batch(cfg, batch=a.batch, seq=a.seq, lq=a.questions, q=a.q,
                           samples=a.packed)
          runs["fusion packed"] = figures(time_jax(cfg, b, a.steps, _trace_dir(a, "packed"),
                                                   _hlo_path(a, "packed"), a.loss_chunks,
                                                   a.vocab_pad),
                                          fl["packed"], tokens)
        except Exception as e:  # the model may not consume packed batches yet
          msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
          runs["fusion packed"] = {"skipped": f"{type(e).__name__}: {msg[:160]}"}
    if a.part in ("all", "torch") and a.torch:
      runs["torch Phi3 baseline"] = figures(
          time_torch(cfg.llm, batch=a.batch, seq=a.seq, steps=a.steps),
          {"model": torch_fl["model"], "remat": torch_fl["remat"]}, tokens)

  base = runs.get("torch Phi3 baseline", {})
  for name, r in runs.items():
    if name.startswith("fusion") and "tokens_per_s" in r and "tokens_per_s" in base:
      r["tokens_per_s_vs_torch"] = r["tokens_per_s"] / base["tokens_per_s"]
  report = dict(
      preset=a.preset, llm_layers=cfg.llm.num_layers, preset_llm_layers=full_depth,
      vision_layers=cfg.vision.num_layers, batch=a.batch, seq_len=a.seq, q=a.q,
      questions=a.questions, packed_samples=a.packed, dtype=a.dtype, attention=a.attention,
      vision_attention=a.vision_attention, remat=a.remat, loss_chunks=a.loss_chunks,
      vocab_pad=a.vocab_pad or loss_vocab_pad(),
      scan=a.scan,
      fusion_flops_share={k: v["fusion_share"] for k, v in fl.items()},
      flops_fwd={k: v["fwd"] for k, v in fl.items()}, runs=runs)
  if a.part == "all":
    print(f"FUSION {a.preset}: LLM {cfg.llm.num_layers}/{full_depth} layers"
          + (" (fewer than the preset, for one device's memory)" if cfg.llm.num_layers < full_depth
             else "")
          + f", tower {cfg.vision.num_layers} layers, {a.batch} x {a.seq} tokens/step, q {a.q}, "
          f"Lq {a.questions}, {a.dtype}, remat {a.remat}, loss chunks {a.loss_chunks}, "
          f"vocab padded to a multiple of {a.vocab_pad or loss_vocab_pad()}, "
          f"attention {a.attention} "
          f"(tower {a.vision_attention})")
    print("FUSION-specific share of the model FLOPs (tower, projectors, interaction): "
          + ", ".join(f"{k} {v['fusion_share']:.1%}" for k, v in fl.items()))
    print(table(report))
    for name, r in runs.items():
      if r.get("kernel_ms_per_step"):
        print(kernels_line(name, r["kernel_ms_per_step"]))
        if r.get("kernel_ms_by_part"):
          print(f"{name}, kernels per step by part: " + ", ".join(
              f"{k} {v:.1f} ms" for k, v in r["kernel_ms_by_part"].items()))
        print("\n".join(f"  {k['ms']:8.2f} ms {k['calls']:7.1f}x  {k['kernel_class'][:5]:5}  "
                         f"{k['name'][:90]}" for k in r["top_kernels"][:15]))
  if a.out:
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
      json.dump(report, f, indent=1, default=str)
  return report


def main(args) -> int:
  measure(args)
  return 0


if __name__ == "__main__":
  sys.argv[1:] = with_tiny(sys.argv[1:])
  cli.app_main(define_flags, main, PROG)
