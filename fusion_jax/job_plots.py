"""The main job's two charts: one loss curve over every stage, accuracy against each target."""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fusion_jax.train.metrics import read_metrics


def plot_job_loss(stages: Sequence[tuple[str, str]], out: str) -> str | None:
  """Loss (and its parts) of all stages, [(name, workdir)] in order, on one step axis with each
  stage boundary marked; log-scale y so the tail stays readable. Returns `out` (None if no
  records)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
  offset, colors, any_pts = 0, {}, False
  for i, (name, workdir) in enumerate(stages):
    records = read_metrics(workdir)
    if not records:
      continue
    keys = ["loss"] + sorted({k for r in records for k in r if k.startswith("loss/")})
    for k in keys:
      pts = [(offset + r["step"], r[k]) for r in records
             if k in r and math.isfinite(r[k]) and r[k] > 0]
      if not pts:
        continue
      any_pts = True
      line, = ax.plot(*zip(*pts), color=colors.get(k), linewidth=1.5 if k == "loss" else 1.0,
                      label=k if k not in colors else None)
      colors[k] = line.get_color()
    last = max(r["step"] for r in records)
    if i:
      ax.axvline(offset, color="black", linestyle="--", linewidth=1)
    ax.text(offset, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="bottom", fontsize=9)
    offset += last
  if not any_pts:
    plt.close(fig)
    return None
  ax.set_yscale("log")
  ax.set_xlabel("step (all stages)")
  ax.set_ylabel("loss (log scale)")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out)
  plt.close(fig)
  return out


def plot_targets(report: Mapping[str, Mapping[str, Any]], targets: Mapping[str, float],
                 out: str) -> str:
  """Held-out accuracy per category (green = target met), chance and target marked."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cats = [c for c in report if c != "all"]
  acc = np.array([report[c]["accuracy"] for c in cats])
  need = np.array([targets.get(c, np.nan) for c in cats])
  fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(cats)), 4.2))
  xs = np.arange(len(cats))
  ax.bar(xs, acc, color=["tab:green" if a >= n else "tab:gray" for a, n in zip(acc, need)],
         label="accuracy (green: target met)")
  ax.scatter(xs, [report[c]["chance"] for c in cats], color="tab:red", marker="_", s=400,
             label="chance", zorder=3)
  ax.scatter(xs, need, color="black", marker="v", s=40, label="target", zorder=4)
  ax.set_xticks(xs, cats, rotation=40, ha="right")
  ax.set_ylim(0, 1.05)
  ax.set_ylabel("held-out accuracy")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
