"""The main job's evaluation: held-out accuracy per category, one greedy answer per category,
and the job's plots."""
from __future__ import annotations

import os
from typing import Any


def sample_answers(workdir: str, heldout: str) -> list[dict[str, str]]:
  """The trained model's greedy answer to the first held-out question of each category."""
  from fusion_jax.data.sources import iter_records
  from fusion_jax.infer.generate import answer_run, first_questions, question_text
  firsts: dict[str, dict[str, Any]] = {}
  for rec in iter_records(heldout):
    firsts.setdefault(str(rec.get("category", "")), rec)
  prompts, refs = first_questions(list(firsts.values()), len(firsts))
  answers, _ = answer_run(workdir, prompts, image_root=os.path.dirname(heldout),
                          max_new_tokens=16)
  return [{"category": p.get("category", ""), "question": question_text(p), "answer": a,
           "reference": r} for p, a, r in zip(prompts, answers, refs)]


def plot_job(plan: list[tuple[str, Any, str]], categories: dict[str, Any],
             targets: dict[str, float], workdir: str, split: str) -> tuple[str, str]:
  """(job loss curve over the stages, accuracy-vs-target bars) PNG paths in `workdir`."""
  from fusion_jax import job_plots
  curve = job_plots.plot_job_loss([(n, d) for n, _, d in plan],
                                  os.path.join(workdir, "job_loss_curve.png"))
  bars = job_plots.plot_targets(categories, targets,
                                os.path.join(workdir, f"eval_{split}_targets.png"))
  return curve, bars
