"""The main job's accuracy targets and its summary (summary.json and the printed table)."""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

ACCURACY_TARGET = {"SynthColor": 0.9}
CHANCE_MULTIPLE = 2.0


def target_of(category: str, chance: float) -> float:
  """The accuracy a category must reach: its own target or CHANCE_MULTIPLE x chance."""
  return max(ACCURACY_TARGET.get(category, 0.0), CHANCE_MULTIPLE * chance)


def check_targets(report: dict[str, Any]) -> list[tuple[str, str, bool]]:
  """(category, target text, met) for the main job's accuracy targets."""
  rows = []
  for cat, r in report.items():
    if cat == "all":
      continue
    need = target_of(cat, r["chance"])
    rows.append((cat, f">= {need:.2f}", r["accuracy"] >= need))
  return rows


def summarize(config: ml_collections.ConfigDict, workdir: str, *, wall_time_s: float,
              times: dict[str, float], stage_runs: list[dict[str, Any]],
              train_summary: dict[str, Any], ev: dict[str, Any],
              samples: list[dict[str, str]], export_note: str | None,
              plots: tuple[str, str], export_dir: str | None) -> dict[str, Any]:
  """The job's summary: times, stages, final metrics, eval, targets, samples and its files."""
  job_curve, targets_plot = plots
  split = config.eval.split
  return {
      "workdir": workdir, "wall_time_s": wall_time_s, "stage_time_s": times,
      "train": stage_runs[-1], "stages": stage_runs,
      "final_metrics": train_summary.get("last") or {}, "eval": ev["categories"],
      "eval_kinds": ev.get("kinds") or {},
      "targets": [{"category": c, "target": t, "met": m} for c, t, m in
                  check_targets(ev["categories"])],
      "samples": samples, "export_note": export_note,
      "files": {"summary": os.path.join(workdir, "summary.json"),
                "base_model": config.init_from if config.get("base") and config.base.get("llm")
                else None,
                "checkpoints": train_summary.get("checkpoint_dir"),
                "job_loss_curve": job_curve,
                **{f"loss_curve:{r['stage']}": os.path.join(r["workdir"], "loss_curve.png")
                   for r in stage_runs},
                **{f"metrics:{r['stage']}": os.path.join(r["workdir"], "metrics.jsonl")
                   for r in stage_runs},
                "tensorboard": os.path.join(workdir, "tb"),
                "eval": os.path.join(workdir, f"eval_{split}.json"),
                "eval_plot": os.path.join(workdir, f"eval_{split}.png"),
                "eval_targets_plot": targets_plot,
                "export_torch": export_dir},
  }


def write(summary: dict[str, Any]) -> None:
  """summary.json in the job's workdir, and the table on stdout."""
  with open(summary["files"]["summary"], "w") as f:
    json.dump(summary, f, indent=2, default=str)
  print(format_summary(summary), flush=True)


def _short(text: str, n: int) -> str:
  """`text` on one line, cut to n characters."""
  text = " ".join(text.split())
  return text if len(text) <= n else text[:n - 3] + "..."


def format_summary(s: dict[str, Any]) -> str:
  lines = ["", "=" * 72, "FUSION main job summary", "=" * 72]
  lines.append(f"wall time {s['wall_time_s']:.0f} s  (" + ", ".join(
      f"{k} {v:.0f} s" for k, v in s["stage_time_s"].items()) + ")")
  m = s["final_metrics"]
  if m:
    parts = [f"{k} {m[k]:.4f}" for k in ("loss", "ce", "text_map", "vision_map") if k in m]
    lines.append(f"step {s['train']['step']}: " + ", ".join(parts))
  for st in s.get("stages", []):
    lines.append(f"stage {st['stage']}: {st['step']} steps in {st['workdir']}")
  lines.append("")
  lines.append(f"{'category':<20} {'accuracy':>8} {'chance':>7} {'target':>8} {'met':>4} "
               f"{'n':>5}")
  met = {t["category"]: t for t in s["targets"]}
  for cat, r in s["eval"].items():
    t = met.get(cat)
    lines.append(f"{cat:<20} {r['accuracy']:>8.3f} {r['chance']:>7.3f} "
                 f"{t['target'] if t else '':>8} {('yes' if t['met'] else 'NO') if t else '':>4} "
                 f"{r['count']:>5d}")
  unmet = [t["category"] for t in s["targets"] if not t["met"]]
  if unmet:
    lines.append(f"{len(unmet)} of {len(s['targets'])} targets not met: {', '.join(unmet)} "
                 "(docs/main_job.md says what limits them)")
  kinds = {k: r for k, r in (s.get("eval_kinds") or {}).items() if k != "all"}
  if kinds:
    # A category mixes kinds of answer; a kind answered by one constant shows its share.
    lines.append("by kind of answer: " + ", ".join(
        f"{k} {r['accuracy']:.2f}" + (f" ({r['top_share']:.0%} {r['top']!r})"
                                      if r.get("top_share", 0) >= 0.6 else "")
        for k, r in kinds.items()))
  if s.get("samples"):
    lines.append("")
    lines.append("sample answers (greedy, first held-out question per category that fits):")
    for x in s["samples"]:
      lines.append(f"  {x['category']:<20} {_short(x['question'], 56):<56} -> "
                   f"{_short(x['answer'], 30)!r} (reference {_short(x['reference'], 30)!r})")
  lines.append("")
  for k, v in s["files"].items():
    if v:
      lines.append(f"{k:<22} {v}")
  if s.get("export_note"):
    lines.append(f"note: {s['export_note']}")
  return "\n".join(lines)
