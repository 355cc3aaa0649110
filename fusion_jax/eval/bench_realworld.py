"""Metrics of the real-world and hallucination benchmarks: RealWorldQA, HallusionBench,
MME-RealWorld.

Scorers return bench_metrics' report layout ({"metrics", "categories", "rows"}). Sources:
  * RealWorldQA: lmms-eval realworldqa/utils.py realworldqa_process_results with
    _task_utils/mcq_extract.py extract_mcq_answer.
  * HallusionBench: VLMEvalKit dataset/utils/yorn.py Hallusion_rating (aAcc, fAcc, qAcc) on
    YOrN_Extraction answers; with --judge_url, VLMEvalKit's YOrN_auxeval for those it cannot
    read (lmms-eval's hallusion_bench needs a GPT judge for every answer).
  * MME-RealWorld: lmms-eval mme_realworld/utils.py extract_characters_regex and
    mme_realworld_aggregate_results.
lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval) commit 75571cf; VLMEvalKit
(github.com/open-compass/VLMEvalKit) commit e8e78f0.
"""
from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

from fusion_jax.eval import bench_judge
from fusion_jax.eval.bench_formats import Row
from fusion_jax.eval.bench_metrics import accuracy_report, mean, read_yes_no, yes_no


# ---------------------------------------------------------------- RealWorldQA
_MCQ_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is",
    "the best answer is", "best answer is", "the correct option is", "correct option is",
    "the best option is", "best option is", "the choice is", "choice is", "the correct choice is",
    "correct choice is", "i choose", "i select", "i pick", "my answer is", "my choice is",
    "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")
# format -> priority: the highest wins, then the later position
_MCQ_PRIORITY = {"start": 10, "end": 9, "phrase": 7, "parentheses": 6, "period": 5, "colon": 4,
                 "right_paren": 3, "space": 2, "fallback": 0}


def extract_mcq_answer(response: str, choices: Sequence[str] = tuple("ABCDEFGH")) -> str:
  """The choice letter of a free-form answer, or '' (lmms-eval _task_utils/mcq_extract.py
  extract_mcq_answer): candidates in the formats of _MCQ_PRIORITY, the best format's last one
  wins; any occurrence of a letter only when no format matched."""
  if not response or not response.strip():
    return ""
  text = response.strip()
  for ch in ",.!?;:'\"":
    text = text.strip(ch)
  text = f" {text} "
  cands: list[tuple[str, int, str]] = []
  for fmt, name in (("({})", "parentheses"), ("{}.", "period"), ("{}:", "colon"),
                    ("{})", "right_paren"), ("{} ", "space")):
    cands += [(c, text.rfind(fmt.format(c)), name) for c in choices if fmt.format(c) in text]
  low = text.lower()
  for phrase in _MCQ_PHRASES:
    at = low.find(phrase)
    if at != -1:
      cands += [(c, text.find(c, at + len(phrase)), "phrase") for c in choices
                if text.find(c, at + len(phrase)) != -1]
  bare = text.strip()
  cands += [(c, 0, "start") for c in choices
            if bare.startswith(c) and (len(bare) == 1 or not bare[1].isalpha())]
  cands += [(c, len(text) - 1, "end") for c in choices
            if bare.endswith(c) and (len(bare) == 1 or not bare[-2].isalpha())]
  if not cands:
    cands = [(c, text.rfind(c), "fallback") for c in choices if c in text]
  if not cands:
    return ""
  return max(cands, key=lambda x: (_MCQ_PRIORITY[x[2]], x[1]))[0]


def realworldqa_correct(prediction: str, answer: str) -> float:
  """lmms-eval realworldqa_process_results: a reference A-D is compared with
  extract_mcq_answer's letter (choices A-D); any other reference (a number, a word) with the
  answer lower-cased, stripped and without a trailing full stop."""
  gt = answer.strip()
  if gt.upper() in ("A", "B", "C", "D"):
    return float(extract_mcq_answer(prediction, "ABCD") == gt.upper())
  return float(prediction.lower().strip().rstrip(".") == gt.lower())


def score_realworldqa(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """RealWorldQA exact-match accuracy as lmms-eval scores it."""
  right = [realworldqa_correct(p, str(r.answer)) for r, p in zip(rows, preds)]
  per_row = [{"index": r.index, "prediction": p,
              "extracted": extract_mcq_answer(p, "ABCD") if str(r.answer).strip().upper()
              in ("A", "B", "C", "D") else p.lower().strip().rstrip("."),
              "answer": r.answer, "correct": bool(c)} for r, p, c in zip(rows, preds, right)]
  return accuracy_report(rows, right, per_row)


# ---------------------------------------------------------------- HallusionBench
def hallusion_ids(row: Row) -> tuple[str, str, str]:
  """(set_id, figure_id, question_id): VLMEvalKit reads them from the index's fields 3, 4, 5
  ('_'-separated); lmms-eval's layout has them as columns; else the row is its own set."""
  parts = row.index.split("_")
  if len(parts) >= 6:
    return parts[3], parts[4], parts[5]
  if all(k in row.extra for k in ("set_id", "figure_id", "question_id")):
    return row.extra["set_id"], row.extra["figure_id"], row.extra["question_id"]
  return row.index, row.index, row.index


def _hallusion_truth(answer: Any) -> str:
  """'yes' / 'no' of a reference: VLMEvalKit 'Yes' / 'No', lmms-eval gt_answer '1' / '0'."""
  a = str(answer).strip()
  return {"1": "yes", "0": "no"}.get(a, yes_no(a))


def score_hallusionbench(rows: Sequence[Row], preds: Sequence[str],
                         judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """HallusionBench as VLMEvalKit's Hallusion_rating: aAcc = share of questions right; fAcc =
  share of figures (l2-category, set, figure) with all their questions right; qAcc = share of
  questions (l2-category, set, question) right on every figure they are asked about; overall,
  per category (VD / VS) and per l2-category (subcategory). Answers are read by YOrN_Extraction
  (exact matching); with a judge, those it reads as neither yes nor no are matched by the judge
  (YOrN_auxeval, up to 5 tries)."""
  said, judged = read_yes_no(rows, preds, judge)
  right = [float(s == _hallusion_truth(r.answer)) for r, s in zip(rows, said)]
  l2 = [r.extra.get("l2-category") or r.extra.get("subcategory") or "" for r in rows]
  ids = [hallusion_ids(r) for r in rows]

  def metrics(members: Sequence[int]) -> dict[str, Any]:
    figs: dict[str, list[float]] = collections.defaultdict(list)
    qs: dict[str, list[float]] = collections.defaultdict(list)
    for i in members:
      figs[f"{l2[i]}_{ids[i][0]}_{ids[i][1]}"].append(right[i])
      qs[f"{l2[i]}_{ids[i][0]}_{ids[i][2]}"].append(right[i])
    return {"aAcc": mean([right[i] for i in members]),
            "fAcc": mean([float(all(v)) for v in figs.values()]),
            "qAcc": mean([float(all(v)) for v in qs.values()]), "count": len(members)}

  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i, r in enumerate(rows):
    if r.category:
      groups[r.category].append(i)
    if l2[i]:
      groups[l2[i]].append(i)
  per_row = [{"index": r.index, "prediction": p, "extracted": s,
              "answer": _hallusion_truth(r.answer), "correct": bool(c)}
             for r, p, s, c in zip(rows, preds, said, right)]
  for i, entry in judged.items():
    per_row[i].update(entry)
  return {"metrics": metrics(range(len(rows))),
          "categories": {g: metrics(m) for g, m in sorted(groups.items())}, "rows": per_row}


# ---------------------------------------------------------------- MME-RealWorld
_MME_RW_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                    "The best option is", "The correct option is", "Best answer:",
                    "Best option:")


def mme_realworld_letter(response: str) -> str:
  """The letter A-E of an answer, or '' (lmms-eval mme_realworld/utils.py
  extract_characters_regex): answer phrases removed, then the first capital A-E; a long answer
  (over 10 words) without one is ''; without a capital, the letter whose "(x)" contains the
  lower-cased answer (an answer emptied by the phrase removal reads as A, as there)."""
  s = response.strip()
  for prefix in _MME_RW_PREFIXES:
    s = s.replace(prefix, "")
  if len(s.split()) > 10 and not re.search("[ABCDE]", s):
    return ""
  m = re.search(r"[ABCDE]", s)
  if m is None:
    for choice in ("(A)", "(B)", "(C)", "(D)", "(E)"):
      if s.lower() in choice.lower():
        return choice[1]
    return ""
  return m[0]


def mme_realworld_groups(row: Row) -> tuple[str, str, str]:
  """(task, subtask, l2-category) as lmms-eval's aggregation reads them: Perception when the
  category names it, else Reasoning; the category's last '/' part; the l2-category lower-cased,
  "<x>/..attribute.." folded to "<x>/attribute"."""
  task = "Perception" if "perception" in row.category.lower() else "Reasoning"
  l2 = (row.extra.get("l2-category") or row.extra.get("l2_category") or "").lower()
  if "attribute" in l2:
    l2 = l2.split("/")[0] + "/attribute"
  return task, row.category.split("/")[-1], l2


def score_mme_realworld(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """MME-RealWorld accuracy (lmms-eval mme_realworld_aggregate_results; VLMEvalKit
  get_dimension_rating counts the same): overall, per task (Perception / Reasoning), per
  task/subtask and per task/subtask/l2-category, each the share of its questions right. `e_ratio`
  is the share of answers that are E (lmms-eval logs it: E is often "none of the above")."""
  letters = [mme_realworld_letter(p) for p in preds]
  right = [float(k.lower() == str(r.answer).lower() or str(r.answer).lower() in k.lower())
           for r, k in zip(rows, letters)]
  groups: dict[str, list[int]] = collections.defaultdict(list)
  for i, r in enumerate(rows):
    task, sub, l2 = mme_realworld_groups(r)
    for name in (task, f"{task}/{sub}", f"{task}/{sub}/{l2}"):
      groups[name].append(i)

  def metrics(members: Sequence[int]) -> dict[str, Any]:
    return {"accuracy": mean([right[i] for i in members]),
            "e_ratio": mean([float(letters[i] == "E") for i in members]), "count": len(members)}

  per_row = [{"index": r.index, "prediction": p, "extracted": k, "answer": r.answer,
              "correct": bool(c)} for r, p, k, c in zip(rows, preds, letters, right)]
  return {"metrics": metrics(range(len(rows))),
          "categories": {g: metrics(m) for g, m in sorted(groups.items())}, "rows": per_row}
