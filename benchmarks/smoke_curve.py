r"""Held-out accuracy per category along the main job's training: the learning curve.

  python benchmarks/smoke_curve.py --config experiments/smoke.py[:ARG] --workdir runs/curve
      [--scale 1.0] [--every 100] [--seq_len 0] [--config.KEY=VALUE ...]

Runs the config's stages (fusion_jax.run.stage_plan: each stage from the previous one's
weights) with num_steps x scale, keeps a checkpoint every `--every` steps, then scores each
checkpoint on the held-out split (fusion_jax/eval/closed_qa.py) at the final stage's
sequence length (or --seq_len). Prints the curve and, per category, the first step at which the
main job's target (fusion_jax.run.check_targets) is met, then the same curve by kind of
answer over all categories (colour, shape, spatial, yes_no, ...); writes <workdir>/curve.json,
<workdir>/curve.png and <workdir>/curve_kinds.png. A stage interrupted or already trained is
resumed / reused. Like the main job, it starts from the config's base models (config.base).

Time on the x axis is training wall time (median step time of each stage x steps), without
compile, synthesis or evaluation.
"""
from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

from fusion_jax import run as run_lib  # noqa: E402
from fusion_jax.eval.evaluate import run_eval  # noqa: E402
from fusion_jax.train.metrics import read_metrics  # noqa: E402
from fusion_jax.infer.workdir import checkpoint_steps  # noqa: E402

FLAGS = flags.FLAGS
# --config and --workdir are fusion_jax.run's flags (defined when it is imported).
flags.DEFINE_float("scale", 1.0, "multiply the config's num_steps")
flags.DEFINE_integer("every", 100, "checkpoint (and score) every K steps of each stage")
flags.DEFINE_integer("seq_len", 0, "scoring length (0: the last stage's data.seq_len)")
flags.DEFINE_integer("batch_size", 64, "sequences per scoring batch")


def _step_time(stage_dir: str) -> float:
  times = [r["step_time_s"] for r in read_metrics(stage_dir) if r.get("step_time_s")]
  return statistics.median(times) if times else float("nan")


def main(argv) -> None:
  del argv
  if FLAGS.config is None or not FLAGS.workdir:
    raise app.UsageError("--config and --workdir are required")
  a = FLAGS
  logging.set_verbosity(logging.WARNING)
  config = FLAGS.config
  config.num_steps = max(1, int(round(config.num_steps * a.scale)))
  config.checkpoint.every = a.every
  config.checkpoint.keep_last = 10**6
  workdir = os.path.abspath(a.workdir)
  # With the workdir, prepare imports the config's base models as the main job does (without
  # it, it would train from random init with a tokenizer of its own).
  config = run_lib.prepare(config, workdir)
  from fusion_jax.train.loop import train
  plan = run_lib.stage_plan(config, workdir)
  seq_len = a.seq_len or int(plan[-1][1].data.seq_len)
  heldout = os.path.join(config.data.image_root, f"{config.eval.split}.json")

  points, offset_steps, offset_s = [], 0, 0.0
  for name, stage_config, stage_dir in plan:
    print(f"== stage {name}: {stage_config.num_steps} steps in {stage_dir}", flush=True)
    train(stage_config, stage_dir)
    dt = _step_time(stage_dir)
    for step in checkpoint_steps(stage_dir):
      ev = run_eval(stage_dir, data=heldout, step=step, batch_size=a.batch_size,
                    seq_len=seq_len, write=False)
      cats = ev["categories"]
      points.append({
          "stage": name, "step": step, "total_step": offset_steps + step,
          "train_s": offset_s + step * dt,
          "accuracy": {c: r["accuracy"] for c, r in cats.items()},
          "kinds": {k: r["accuracy"] for k, r in ev["kinds"].items()},
          "met": {c: m for c, _, m in run_lib.check_targets(cats)}})
      print(f"{name} step {step}: " + ", ".join(
          f"{c} {r['accuracy']:.3f}" for c, r in cats.items()), flush=True)
    offset_steps += stage_config.num_steps
    offset_s += stage_config.num_steps * dt

  targets = {c: t for c, t, _ in run_lib.check_targets(cats)}
  first = {c: next((pt["total_step"] for pt in points if pt["met"].get(c)), None) for c in targets}
  with open(os.path.join(workdir, "curve.json"), "w") as f:
    json.dump({"config": config.to_dict(), "scale": a.scale, "seq_len": seq_len, "points": points,
               "targets": targets, "first_met_step": first}, f, indent=2, default=str)
  _plot(points, "accuracy", {c: float(t.split()[-1]) for c, t in targets.items()},
        os.path.join(workdir, "curve.png"),
        "held-out accuracy (dashed: main-job target; dotted: next stage)")
  _plot(points, "kinds", {k: r["chance"] for k, r in ev["kinds"].items()},
        os.path.join(workdir, "curve_kinds.png"),
        "held-out accuracy by kind of answer, all categories (dashed: chance; dotted: next stage)")

  cats = [c for c in points[-1]["accuracy"] if c != "all"]
  print("\n" + f"{'step':>6} {'train s':>8} " + " ".join(f"{c[5:][:9]:>9}" for c in cats))
  for pt in points:
    print(f"{pt['total_step']:>6} {pt['train_s']:>8.0f} " + " ".join(
        f"{pt['accuracy'][c]:>8.3f}{'*' if pt['met'][c] else ' '}" for c in cats))
  print("(* = target met)\nfirst step meeting the target: " + ", ".join(
      f"{c} {first[c] if first[c] is not None else 'never'} ({targets[c]})" for c in cats))
  kinds = [k for k in points[-1]["kinds"] if k != "all"]
  print("\nby kind of answer (all categories):\n" + f"{'step':>6} " +
        " ".join(f"{k[:9]:>9}" for k in kinds))
  for pt in points:
    print(f"{pt['total_step']:>6} " + " ".join(f"{pt['kinds'].get(k, float('nan')):>9.3f}"
                                               for k in kinds))
  print(f"wrote {workdir}/curve.json, {workdir}/curve.png, {workdir}/curve_kinds.png")


def _plot(points, field: str, marks: dict[str, float], path: str, title: str) -> None:
  """One panel per series of points[i][field]; red dashed: marks[series] (a target or chance
  level), gray dotted: stage boundaries."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cats = [c for c in points[-1][field] if c != "all"]
  cols = 5
  rows = -(-len(cats) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
  xs = [pt["total_step"] for pt in points]
  boundaries = [pt["total_step"] - pt["step"] for pt, prev in zip(points[1:], points)
                if pt["stage"] != prev["stage"]]
  for ax, c in zip(axes.flat, cats):
    ax.plot(xs, [pt[field].get(c, float("nan")) for pt in points], marker=".")
    if c in marks:
      ax.axhline(marks[c], color="r", ls="--", lw=1)
    for x in boundaries:
      ax.axvline(x, color="gray", ls=":", lw=1)
    ax.set_title(c, fontsize=9)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step", fontsize=8)
  for ax in list(axes.flat)[len(cats):]:
    ax.axis("off")
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  app.run(main)
