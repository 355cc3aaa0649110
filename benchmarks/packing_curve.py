r"""Packed vs unpacked training on the main job's data: samples per second and loss curves.

  python benchmarks/packing_curve.py --workdir runs/packing_curve [--samples 2400]
      [--seq_len 192] [--max_samples_per_row 2] [--num 24000] [--rows_packed 0]
      [--pinned [--swap_cores] | --sequential | --interleaved [--batches 8 --rounds 6]
      [--profile DIR]]

Trains the main job's model (experiments/smoke.py: tiny FUSION, all mechanisms on) on its
dataset (all categories, the instruction stage's data) twice from the same initialisation,
for the same number of samples:

  unpacked  one sample per row, global batch 16 rows (the main job's setting)
  packed    data.packing with P = --max_samples_per_row, --rows_packed rows per batch (0:
            16 / the expected samples per row, so both see ~16 samples per optimizer step and
            the learning-rate schedule covers the same samples)

Both use the same seq_len (--seq_len; the main job's instruction stage: 192), so every sample
is truncated identically. The two trainings run at the same time in two processes, so both see
the same load on a shared machine (the one that finishes first leaves the other more CPU: the
speed-up is then underestimated, not overestimated). --pinned runs them at the same time with
each process held to a core of its own (the fairest on a shared machine whose speed drifts:
both see the same minutes, neither takes the other's core); --sequential runs them one after
the other. Reports training samples/s (steps after
the first three, without compilation; over each whole run and over the time both ran),
packing efficiency (aux/packing_efficiency, logged per step), the training loss against
samples seen and against seconds of training (both curves, PNG), and the held-out loss (CE
per supervised token, the same unpacked held-out batches for both final models). Writes
<workdir>/packing_curve.json and <workdir>/packing_curve.png.

--interleaved trains nothing: it compiles both train steps in one process, takes --batches real
batches of each from the pipeline, and times them alternately (--batches unpacked steps, then
--batches packed steps, --rounds times) on both cores: both programs see the same minutes of
the machine. Samples per second count each packed batch's own samples (segment ids); the
speed-up is reported per round and as the median. Writes <workdir>/packing_interleaved.json.
--profile DIR then traces 3 more steps of each (jax.profiler) and prints where a step's time
goes by part of the model: each XLA:CPU operation in the trace is attributed through its HLO
instruction's op_name (`cpu_parts`); the sums are operation time, which can exceed the step's
wall time where operations overlap.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402

PROG = "python benchmarks/packing_curve.py"
WARMUP_STEPS = 3  # compile + first steps, left out of the samples/s


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", None, "where the two runs and the report go", flag_values=fv,
                      required=True)
  flags.DEFINE_integer("samples", 2400, "training samples per run", flag_values=fv)
  flags.DEFINE_integer("seq_len", 192, "row length of both runs", flag_values=fv)
  flags.DEFINE_integer("max_samples_per_row", 2, "P of the packed run", flag_values=fv)
  flags.DEFINE_integer("rows_packed", 0, "rows per packed batch (0: 16 / expected samples per row)",
                       flag_values=fv)
  flags.DEFINE_integer("num", 24000, "dataset records (smoke.py: 24000)", flag_values=fv)
  flags.DEFINE_bool("pinned", False, "train the two runs at the same time, each process on a "
                    "core of its own (needs 2 cores)", flag_values=fv)
  flags.DEFINE_bool("swap_cores", False, "with --pinned: packed on the first core, unpacked on "
                    "the second (a check that neither core is the faster)", flag_values=fv)
  flags.DEFINE_bool("sequential", False, "train the two runs one after the other (an idle "
                    "machine: each has all its cores) instead of at the same time",
                    flag_values=fv)
  flags.DEFINE_bool("interleaved", False, "no training: time the two train steps alternately "
                    "in one process on the same real batches", flag_values=fv)
  flags.DEFINE_integer("batches", 8, "--interleaved: batches of each run", flag_values=fv)
  flags.DEFINE_integer("rounds", 6, "--interleaved: alternations", flag_values=fv)
  flags.DEFINE_string("profile", "", "--interleaved: trace 3 steps of each run under this "
                      "folder and print the time by part of the model", flag_values=fv)
  flags.DEFINE_string("train_one", "", "internal: the child process that trains DIR/config.json",
                      flag_values=fv)


def _expected_samples_per_row(config, seq_len: int, p: int) -> float:
  """samples per row of the packer on 3000 of the dataset's records (packing_plan: length-only
  simulation, q = the largest)."""
  from fusion_jax.data import packing, packing_plan
  from fusion_jax.task.fusion import FusionTask
  task = FusionTask(config)
  cfg = task.data_config(1)
  encs, _ = packing_plan.encoded_samples(cfg, task.tokenizer, 3000)
  lengths = packing_plan.sample_lengths(cfg, encs, max(cfg.query_len))
  r = packing.simulate(lengths, batch_size=8, seq_len=seq_len, samples_per_row=p, buffer=16 * p)
  return r["samples_per_row"]


def _train(workdir: str) -> int:
  """Child process: trains <workdir>/config.json into <workdir>."""
  import ml_collections
  from absl import logging
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  from fusion_jax.train.loop import train
  with open(os.path.join(workdir, "config.json")) as f:
    config = ml_collections.ConfigDict(json.load(f))
  train(config, workdir)
  return 0


def _interleaved(configs: dict, args) -> dict:
  """Both train steps in this process, timed alternately on the same real batches."""
  import time
  import jax
  from fusion_jax.models import batch_spec
  from fusion_jax.train import loop
  progs = {}
  for name, c in configs.items():
    su = loop.setup(c)
    state, step = su.init_state(), su.make_step(donate=False)
    it = su.task.make_data_iterator(0, 1)
    hosts = [next(it) for _ in range(args.batches)]
    samples = sum(int(batch_spec.sample_mask(h["segment_ids"], h["latent_pos"].shape[1]).sum())
                  for h in hosts)
    batches = [su.global_batch(h) for h in hosts]
    for b in batches:  # compiles every q the batches hold
      jax.block_until_ready(step(state, b))
    progs[name] = (state, step, batches, samples, su.mesh)
  per_s: dict[str, list[float]] = {name: [] for name in progs}
  for r in range(args.rounds):
    for name, (state, step, batches, samples, _) in progs.items():
      t = time.perf_counter()
      for b in batches:
        out = step(state, b)
      jax.block_until_ready(out)
      per_s[name].append(samples / (time.perf_counter() - t))
    print(f"round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f} samples/s" for n, v in per_s.items()),
          flush=True)
  ratios = [p / u for u, p in zip(per_s["unpacked"], per_s["packed"])]
  out = {"samples_per_s": per_s, "samples": {n: p[3] for n, p in progs.items()},
         "speedup_per_round": ratios, "speedup": float(np.median(ratios))}
  if args.profile:
    out["parts_ms_per_step"] = {
        name: _profile(step, state, batches[0], mesh, os.path.join(args.profile, name))
        for name, (state, step, batches, _, mesh) in progs.items()}
  return out


# Parts of a CPU step by op_name (first match wins); the decoder's attention core is everything
# under self_attn but its projections and RoPE.
CPU_PARTS = (("tower and projectors", r"encode_images|vision_tower|projector"),
             ("interaction layers", r"interaction|/block/"),
             ("decoder q/k/v/o projections, RoPE", r"/llm/.*self_attn/.*(_proj|rope|rotary)"),
             ("decoder attention: scores, mask, softmax", r"/llm/.*self_attn/"),
             ("decoder MLP", r"/llm/.*mlp"), ("decoder norms", r"/llm/.*norm"),
             ("optimizer update", r"^(?!.*(jvp|transpose)\()"),
             ("embeddings, LM head, loss, scatter", r""))


def cpu_parts(events: list, op_names: dict[str, str], steps: int) -> dict[str, float]:
  """ms per step by CPU_PARTS of a CPU trace's operation events (named by HLO instruction)."""
  out = {name: 0.0 for name, _ in CPU_PARTS}
  for e in events:
    op = op_names.get(e.get("name")) if e.get("ph") == "X" else None
    if op is not None:
      part = next(name for name, rx in CPU_PARTS if re.search(rx, op))
      out[part] += e["dur"] / 1e3 / steps
  return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def _profile(step, state, batch, mesh, trace_dir: str, steps: int = 3) -> dict[str, float]:
  """Traces `steps` steps of `step` on `batch`; prints and returns `cpu_parts`."""
  import jax
  from step_mfu import hlo_op_names, trace_events
  with jax.set_mesh(mesh):
    hlo = step.jitted.lower(state, batch).compile().as_text()
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(steps):
      jax.block_until_ready(step(state, batch))
  parts = cpu_parts(trace_events(trace_dir), hlo_op_names(hlo), steps)
  total = sum(parts.values())
  print(f"{os.path.basename(trace_dir)}: ms per step by part ({trace_dir})")
  for k, v in parts.items():
    print(f"  {k:42s} {v:8.1f} {100 * v / max(total, 1e-9):5.1f}%")
  return parts


def _summary(workdir: str) -> dict:
  from fusion_jax.train.metrics import read_metrics
  recs = read_metrics(workdir)
  samples = [int(r["data/samples"]) for r in recs]
  per_step = np.diff([0] + samples)
  timed = [(float(r["step_time_s"]), int(n)) for r, n in zip(recs, per_step)
           if r["step"] > WARMUP_STEPS and r.get("step_time_s")]
  t = sum(x for x, _ in timed)
  return {"steps": len(recs), "samples": samples[-1] if samples else 0, "timed": timed,
          "samples_per_s": sum(n for _, n in timed) / t if t else float("nan"),
          "step_time_s": float(np.median([x for x, _ in timed])) if timed else float("nan"),
          "efficiency": float(np.mean([r["aux/packing_efficiency"] for r in recs])),
          "curve": [(int(n), float(r["loss"]), float(r.get("loss/ce", float("nan"))))
                    for n, r in zip(samples, recs)],
          # seconds of training at each record (step times; the first, compiling step has none)
          "seconds": np.cumsum([float(r.get("step_time_s") or 0.0) for r in recs]).tolist()}


def heldout_loss(workdir: str, heldout: str, seq_len: int, batch_size: int = 32) -> dict:
  """CE per supervised token (and the total FUSION loss per batch, averaged) on held-out data,
  unpacked, q = eval_q, the run's newest weights."""
  import jax
  from fusion_jax.data import pipeline
  from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS, load_tokenizer
  from fusion_jax.models import fusion
  from fusion_jax.task.fusion import FusionTask
  from fusion_jax.infer.workdir import load_run
  params, cfg, config, _ = load_run(workdir)
  task = FusionTask(config)
  dc = task.data_config(1).to_dict()
  dc.update(paths=(heldout,), seq_len=seq_len, batch_size=batch_size, packing=False,
            num_epochs=1, prefetch=0, query_len=tuple(cfg.query_len))
  tok = load_tokenizer(config.data.tokenizer, pad_token=TEMPLATE_PAD_TOKENS[cfg.template])
  loss = jax.jit(lambda p, b: fusion.loss_fn(p, b, cfg, train=False))
  ce_sum = n = 0.0
  totals = []
  with pipeline.make_pipeline(pipeline.DataConfig.from_dict(dc), tok, process_index=0,
                              process_count=1, train=False) as it:
    for b in it:
      total, aux = loss(params, b)
      ce_sum += float(aux["ce_sum"])
      n += float(aux["num_tokens"])
      totals.append(float(total))
  return {"ce": ce_sum / max(n, 1.0), "loss": float(np.mean(totals)), "tokens": n}


def _plot(results: dict, out: str) -> None:
  """Training loss against samples seen (left) and against seconds of training (right)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), dpi=100, sharey=True)
  for name, r in results.items():
    ns, ys = zip(*[(n, l) for n, l, _ in r["curve"]])
    k = max(1, min(9, len(ys) // 3))  # moving average over steps, both curves alike
    sm = np.convolve(ys, np.ones(k) / k, mode="valid")
    for ax, xs in zip(axes, (ns, r["seconds"])):
      ax.plot(xs, ys, alpha=0.25, linewidth=0.8)
      ax.plot(xs[k - 1:], sm, label=f"{name} ({r['samples_per_s']:.1f} samples/s)",
              color=ax.lines[-1].get_color(), linewidth=1.6)
  axes[0].set_xlabel("training samples seen")
  axes[1].set_xlabel("seconds of training (compilation left out)")
  axes[0].set_ylabel("training loss")
  fig.suptitle("FUSION main job data: packed vs unpacked")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)


def main(args) -> int:
  if args.train_one:
    return _train(args.train_one)

  import ml_collections
  from absl import logging
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  from experiments.smoke import get_config
  # The main job's steps from their modules: importing fusion_jax.run would define its global
  # --workdir flag next to this program's.
  from fusion_jax.main_job.prepare import prepare
  from fusion_jax.main_job.stages import stage_plan

  config = get_config()
  config.synth.num = args.num
  config = prepare(config)
  workdir = os.path.abspath(args.workdir)
  os.makedirs(workdir, exist_ok=True)
  base = stage_plan(config, workdir)[-1][1]  # the instruction stage: all categories
  base.data.seq_len = args.seq_len
  base.init_from = ""
  base.log_every = 1
  base.checkpoint.every = 0
  base.checkpoint.async_save = False
  heldout = os.path.join(config.data.image_root, f"{config.eval.split}.json")

  spr = _expected_samples_per_row(base, args.seq_len, args.max_samples_per_row)
  rows = args.rows_packed or max(1, round(base.global_batch / spr))
  if args.pinned + args.sequential + args.interleaved > 1:
    raise SystemExit(f"{PROG}: give one of --pinned, --sequential, --interleaved")
  cores = sorted(os.sched_getaffinity(0))
  if args.pinned and len(cores) < 2:
    raise SystemExit(f"{PROG}: --pinned needs 2 cores, this process may use {len(cores)}")
  runs, procs, configs = {}, {}, {}
  for name in ("unpacked", "packed"):
    c = ml_collections.ConfigDict(base.to_dict())
    if name == "packed":
      c.data.packing = True
      c.data.max_samples_per_row = args.max_samples_per_row
      c.global_batch = rows
      c.num_steps = max(1, math.ceil(args.samples / (rows * spr)))
    else:
      c.num_steps = max(1, math.ceil(args.samples / c.global_batch))
    print(f"{name}: {c.num_steps} steps of {c.global_batch} rows", flush=True)
    configs[name] = c
    if args.interleaved:
      continue
    d = os.path.join(workdir, name)
    if os.path.isdir(d):
      shutil.rmtree(d)
    os.makedirs(d)
    with open(os.path.join(d, "config.json"), "w") as f:
      f.write(c.to_json())
    log = open(os.path.join(d, "train.log"), "w")
    pin = None
    if args.pinned:  # each run on a core of its own: unpacked the first, packed the second
      core = cores[len(procs) ^ int(args.swap_cores)]
      pin = lambda core=core: os.sched_setaffinity(0, {core})  # noqa: E731
    procs[name] = (subprocess.Popen([sys.executable, os.path.abspath(__file__), "--workdir", d,
                                     "--train_one", d], stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=pin),
                   int(c.global_batch))
    if args.sequential:
      procs[name][0].wait()
  if args.interleaved:
    out = {"args": vars(args), "expected_samples_per_row": spr, **_interleaved(configs, args)}
    print(f"packed / unpacked samples/s, interleaved in one process: {out['speedup']:.2f}x "
          f"(median of {args.rounds} rounds; per round "
          f"{', '.join(f'{x:.2f}' for x in out['speedup_per_round'])})")
    with open(os.path.join(workdir, "packing_interleaved.json"), "w") as f:
      json.dump(out, f, indent=1)
    return 0
  for name, (proc, n_rows) in procs.items():
    if proc.wait():
      raise RuntimeError(f"{name} training failed; see {workdir}/{name}/train.log")
    d = os.path.join(workdir, name)
    runs[name] = _summary(d)
    runs[name]["heldout"] = heldout_loss(d, heldout, args.seq_len)
    runs[name]["rows"] = n_rows

  u, p = runs["unpacked"], runs["packed"]
  speedup = p["samples_per_s"] / u["samples_per_s"]
  # The faster run ends first and leaves the other the CPU: compare over the time both ran.
  both = min(sum(x for x, _ in r["timed"]) for r in runs.values())
  for r in runs.values():
    t = n = 0.0
    for x, k in r["timed"]:
      if t >= both:
        break
      t, n = t + x, n + k
    r["samples_per_s_together"] = n / t if t else float("nan")
  speedup_together = p["samples_per_s_together"] / u["samples_per_s_together"]
  def last(r):  # mean training loss over the last 20 % of the steps
    return float(np.mean([l for _, l, _ in r["curve"][-max(5, len(r["curve"]) // 5):]]))
  print(f"\nseq_len {args.seq_len}, P = {args.max_samples_per_row}, expected {spr:.2f} "
        f"samples/row -> {rows} packed rows per step")
  print(f"{'':9s} {'steps':>5s} {'samples':>7s} {'samples/s':>9s} {'s/step':>7s} "
        f"{'efficiency':>10s} {'train loss (last 20%)':>21s} {'held-out CE':>11s}")
  for name, r in runs.items():
    print(f"{name:9s} {r['steps']:5d} {r['samples']:7d} {r['samples_per_s']:9.1f} "
          f"{r['step_time_s']:7.3f} {100 * r['efficiency']:9.1f}% {last(r):21.4f} "
          f"{r['heldout']['ce']:11.4f}")
  if args.sequential or args.pinned:
    how = "one run after the other" if args.sequential else "at the same time, a core each"
    print(f"packed / unpacked samples/s: {speedup:.2f}x ({how})")
  else:
    print(f"packed / unpacked samples/s: {speedup:.2f}x over each whole run, "
          f"{speedup_together:.2f}x while both ran ({u['samples_per_s_together']:.1f} vs "
          f"{p['samples_per_s_together']:.1f} samples/s over the first {both:.0f} s)")
  out = {"args": vars(args), "expected_samples_per_row": spr, "speedup": speedup,
         "speedup_together": speedup_together, "runs": runs}
  with open(os.path.join(workdir, "packing_curve.json"), "w") as f:
    json.dump(out, f, indent=1)
  _plot(runs, os.path.join(workdir, "packing_curve.png"))
  print(f"wrote {workdir}/packing_curve.json and packing_curve.png")
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
