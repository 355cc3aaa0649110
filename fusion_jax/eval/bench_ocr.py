"""Metrics of the text-reading benchmarks: OCRBench, ChartQA, DocVQA / InfoVQA.

Scorers return bench_metrics' report layout ({"metrics", "categories", "rows"}). Sources:
  * OCRBench: a question is right when a reference is a substring of the answer (lmms-eval
    ocrbench/utils.py ocrbench_process_results; VLMEvalKit OCRBench.evaluate the same without
    the fullwidth folding); the final score counts the right questions (out of 1000), in five
    groups.
  * ChartQA: relaxed accuracy (lmms-eval chartqa/utils.py relaxed_correctness), per split.
  * DocVQA / InfoVQA: ANLS, threshold 0.5 (lmms-eval api/metrics.py anls).
lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval) commit 75571cf; VLMEvalKit
(github.com/open-compass/VLMEvalKit) commit e8e78f0.
"""
from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any

from fusion_jax.eval.bench_formats import Row
from fusion_jax.eval.bench_metrics import accuracy_report, mean


# ---------------------------------------------------------------- OCRBench
OCRBENCH_HME = "Handwritten Mathematical Expression Recognition"
# the five groups of the final score (lmms-eval ocrbench_aggregate_accuracy, VLMEvalKit
# OCRBench.evaluate): the six recognition types add up to "Text Recognition" (300 questions);
# 200, 200, 200 and 100 questions in the others: 1000 in all
OCRBENCH_GROUPS = {
    "Text Recognition": ("Regular Text Recognition", "Irregular Text Recognition",
                         "Artistic Text Recognition", "Handwriting Recognition",
                         "Digit String Recognition", "Non-Semantic Text Recognition"),
    "Scene Text-centric VQA": ("Scene Text-centric VQA",),
    "Doc-oriented VQA": ("Doc-oriented VQA",),
    "Key Information Extraction": ("Key Information Extraction",),
    OCRBENCH_HME: (OCRBENCH_HME,),
}


def fold_fullwidth(text: str) -> str:
  """Fullwidth ASCII and the ideographic space -> ASCII (lmms-eval _fold_fullwidth_ascii)."""
  return "".join(chr(ord(c) - 0xFEE0) if 0xFF01 <= ord(c) <= 0xFF5E
                 else " " if c == "\u3000" else c for c in text)


def ocrbench_hit(prediction: str, answers: str | Sequence[str], *, hme: bool = False) -> float:
  """1 if any reference is a substring of the answer (lmms-eval ocrbench_process_results):
  case-folded, fullwidth folded, newlines as spaces; for handwritten formulas (HME100k) all
  spaces removed and case kept."""
  pred = prediction.strip()
  for ans in [answers] if isinstance(answers, str) else answers:
    if hme:
      a, p = (x.strip().replace("\n", " ").replace(" ", "") for x in (ans, pred))
    else:
      a, p = (fold_fullwidth(x).lower().strip().replace("\n", " ") for x in (ans, pred))
    if a in p:
      return 1.0
  return 0.0


def ocrbench_type(row: Row) -> str:
  """The question type: VLMEvalKit's `category`, lmms-eval's `question_type`."""
  return row.category or row.extra.get("question_type", "")


def score_ocrbench(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """OCRBench: `score` = questions right (out of 1000 on the full benchmark; lmms-eval reports
  score / 1000), `accuracy` = score / rows scored; per group the same. A question type outside
  the official ten is its own group."""
  types = [ocrbench_type(r) for r in rows]
  hits = [ocrbench_hit(p, r.answer, hme=t == OCRBENCH_HME or r.extra.get("dataset") == "HME100k")
          for r, p, t in zip(rows, preds, types)]
  group_of = {t: g for g, ts in OCRBENCH_GROUPS.items() for t in ts}
  by_group: dict[str, list[float]] = collections.defaultdict(list)
  for t, h in zip(types, hits):
    by_group[group_of.get(t, t or "all")].append(h)
  order = [g for g in OCRBENCH_GROUPS if g in by_group] + sorted(set(by_group) - set(group_of))

  def metrics(hs: Sequence[float]) -> dict[str, Any]:
    return {"score": int(sum(hs)), "accuracy": mean(hs), "count": len(hs)}

  per_row = [{"index": r.index, "prediction": p, "answer": r.answer, "question_type": t,
              "correct": bool(h)} for r, p, t, h in zip(rows, preds, types, hits)]
  return {"metrics": metrics(hits), "categories": {g: metrics(by_group[g]) for g in order},
          "rows": per_row}


# ---------------------------------------------------------------- ChartQA
def _to_float(text: str) -> float | None:
  try:
    return float(text.rstrip("%")) / 100.0 if text.endswith("%") else float(text)
  except ValueError:
    return None


def relaxed_correctness(prediction: str, target: str, max_relative_change: float = 0.05) -> bool:
  """ChartQA's relaxed accuracy (lmms-eval chartqa/utils.py, from Pix2Struct / Qwen-VL): numbers
  (a trailing % divides by 100) may be off by 5 % of a nonzero target; anything else must match
  exactly up to case. The answer is not stripped, as there."""
  p, t = _to_float(prediction), _to_float(target)
  if p is not None and t:
    return abs(p - t) / abs(t) <= max_relative_change
  return prediction.lower() == target.lower()


def chartqa_split(row: Row) -> str:
  """'human' / 'augmented' from lmms-eval's `type` (human_test / augmented_test) or a
  `split` / category cell; '' when the file says nothing."""
  kind = row.extra.get("type") or row.extra.get("split") or row.category
  return "" if not kind else "human" if "human" in kind.lower() else "augmented"


def score_chartqa(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """ChartQA relaxed accuracy overall and per split (lmms-eval's relaxed_overall,
  relaxed_human_split, relaxed_augmented_split); a list of references: any may match."""
  right = [float(any(relaxed_correctness(p, str(a)) for a in
                     ([r.answer] if isinstance(r.answer, str) else r.answer)))
           for r, p in zip(rows, preds)]
  splits = [chartqa_split(r) for r in rows]
  metrics: dict[str, Any] = {"relaxed_overall": mean(right), "count": len(rows)}
  cats = {}
  for s in ("human", "augmented"):
    mine = [v for v, k in zip(right, splits) if k == s]
    if mine:
      metrics[f"relaxed_{s}_split"] = mean(mine)
      cats[s] = {"relaxed_overall": mean(mine), "count": len(mine)}
  per_row = [{"index": r.index, "prediction": p, "answer": r.answer, "split": s,
              "correct": bool(v)} for r, p, s, v in zip(rows, preds, splits, right)]
  return {"metrics": metrics, "categories": cats, "rows": per_row}


# ---------------------------------------------------------------- DocVQA / InfoVQA
def levenshtein(a: str, b: str) -> int:
  """Edit distance (insertions, deletions, substitutions of one character)."""
  if len(a) > len(b):
    a, b = b, a
  prev = list(range(len(a) + 1))
  for j, cb in enumerate(b):
    cur = [j + 1]
    for i, ca in enumerate(a):
      cur.append(prev[i] if ca == cb else 1 + min(prev[i], prev[i + 1], cur[-1]))
    prev = cur
  return prev[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
  """ANLS of one answer (lmms-eval api/metrics.py anls, from Qwen-VL's infographicsvqa_eval):
  1 - the smallest normalised edit distance to a reference (case and runs of whitespace ignored;
  normalised by the longer of the two raw strings), 0 below `threshold`."""
  dists = []
  for ans in [answers] if isinstance(answers, str) else answers:
    gt, det = (" ".join(x.strip().lower().split()) for x in (ans, prediction))
    length = max(len(ans.upper()), len(prediction.upper()))
    dists.append(0.0 if length == 0 else levenshtein(gt, det) / length)
  value = 1 - min(dists) if dists else 0.0
  return 0.0 if value < threshold else value


def score_anls(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """DocVQA / InfoVQA: mean ANLS (threshold 0.5) over the questions."""
  vals = [anls(p, r.answer) for r, p in zip(rows, preds)]
  per_row = [{"index": r.index, "prediction": p, "answers": r.answer, "anls": v}
             for r, p, v in zip(rows, preds, vals)]
  return accuracy_report(rows, vals, per_row, key="anls")
