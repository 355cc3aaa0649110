"""The main job's evaluation: held-out accuracy per category, one greedy answer per category,
and the job's plots."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any


def first_fitting(records: Iterable[Mapping[str, Any]], fits: Callable[[dict[str, Any]], bool]
                  ) -> tuple[dict[str, tuple[dict[str, Any], str]], list[str]]:
  """Per category, the first record's first question (prompt, reference) for which
  fits(prompt) holds; and the categories where none does."""
  from fusion_jax.infer.generate import first_questions
  firsts: dict[str, tuple[dict[str, Any], str]] = {}
  seen: set[str] = set()
  for rec in records:
    cat = str(rec.get("category", ""))
    seen.add(cat)
    if cat in firsts:
      continue
    prompts, refs = first_questions([rec], 1)
    if prompts and fits(prompts[0]):
      firsts[cat] = (prompts[0], refs[0])
  return firsts, sorted(seen - set(firsts))


def sample_answers(workdir: str, heldout: str) -> list[dict[str, str]]:
  """The trained model's greedy answer to the first held-out question of each category whose
  prompt fits the run's sequence length (a last stage trained short may not fit every
  category's first question; a category with none that fits is left out and named)."""
  from fusion_jax.data.sources import iter_records
  from fusion_jax.infer.generate import answer_model, question_text
  from fusion_jax.infer.generator import encode_prompt
  from fusion_jax.infer.load import load_model
  from fusion_jax.main_job import say
  model = load_model(workdir)
  firsts, missing = first_fitting(
      iter_records(heldout),
      lambda p: encode_prompt(p, model.tokenizer, model.cfg, q=model.q)[1] <= model.seq_len)
  if missing:
    say(f"sample answers: no held-out question of {', '.join(missing)} fits seq_len "
        f"{model.seq_len}; left out")
  prompts = [p for p, _ in firsts.values()]
  answers = answer_model(model, prompts, image_root=os.path.dirname(heldout),
                         max_new_tokens=16) if prompts else []
  return [{"category": p.get("category", ""), "question": question_text(p), "answer": a,
           "reference": r} for (p, r), a in zip(firsts.values(), answers)]


def plot_job(plan: list[tuple[str, Any, str]], categories: dict[str, Any],
             targets: dict[str, float], workdir: str, split: str) -> tuple[str, str]:
  """(job loss curve over the stages, accuracy-vs-target bars) PNG paths in `workdir`."""
  from fusion_jax import job_plots
  curve = job_plots.plot_job_loss([(n, d) for n, _, d in plan],
                                  os.path.join(workdir, "job_loss_curve.png"))
  bars = job_plots.plot_targets(categories, targets,
                                os.path.join(workdir, f"eval_{split}_targets.png"))
  return curve, bars
