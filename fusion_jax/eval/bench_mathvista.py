"""MathVista (testmini, VLMEvalKit's MathVista_MINI) scored by rules, and by a judge model where
one is given (eval.bench --judge_url; bench_judge.py).

VLMEvalKit (github.com/open-compass/VLMEvalKit, commit e8e78f0) scores MathVista in
vlmeval/dataset/image_vqa.py MathVista.evaluate_heuristic with vlmeval/dataset/utils/mathvista.py:
MathVista_auxeval first tries the rule check `post_check(line, prefetch=True)` on the raw answer
and asks the GPT judge to extract an answer only where that fails; MathVista_acc then counts
`post_check(line)` on the result. VLMEvalKit has no judge-free mode for MathVista (its evaluator
asserts a working judge; `exact_matching` is other datasets' setting). What is implemented
here is that rule step, and behind it, only with --judge_url, VLMEvalKit's judge step with its
prompt on a model the user serves. Without a judge an answer the rules cannot read counts as
wrong (what VLMEvalKit records when every judge call fails), so the accuracy is a lower bound of
the judged one. The rules (post_check):
  * multi_choice: `can_infer(answer, choices)` (vlmeval/utils/matching_util.py) gives the option
    letter; right when it is the row's `answer_option`.
  * free_form, answer_type integer / float: `int(answer)` / `float(answer)` of the whole answer
    (Python's own parsing: surrounding whitespace is allowed, "14." or "x = 14" is not) equal to
    the reference parsed the same way. The `precision` field is not used by post_check (the
    float must be equal); it only shapes the question's hint.
  * free_form, answer_type list (and text): post_check compares str(None) with the reference (its
    result variable is never set on that branch), so these rows count as wrong in VLMEvalKit,
    judged or not; here too.
One difference: an integer / float answer equal to a reference of 0 is right here. VLMEvalKit's
prefetch returns the parsed 0, which is falsy, so it asks the judge, which would extract the 0
and post_check would count it right; without a judge that row would be lost.
Accuracy as MathVista_acc: overall, per `task` and per skill (a row counts once for each of its
`skills`; tasks, then skills, each sorted, where VLMEvalKit lists them as first met), as
fractions (VLMEvalKit prints percent); `prefetch_rate` is the share of answers the
rules resolved (MathVista_acc's prefetch column: a letter found, or a number equal to the
reference, 0 included here).
"""
from __future__ import annotations

import ast
import collections
from collections.abc import Sequence
from typing import Any

from fusion_jax.eval import bench_judge
from fusion_jax.eval.bench_formats import Row
from fusion_jax.eval.bench_metrics import can_infer
from fusion_jax.eval.bench_prompts import options_of


def _literal(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return None


def _field(row: Row, name: str) -> str:
  """A MathVista field: VLMEvalKit's TSV column, or the HF dataset's `metadata` entry."""
  if row.extra.get(name):
    return row.extra[name]
  meta = _literal(row.extra.get("metadata", ""))
  value = meta.get(name) if isinstance(meta, dict) else None
  return "" if value is None else str(value)


def choices_of(row: Row) -> dict[str, str]:
  """letter -> choice (VLMEvalKit list_to_dict of the `choices` list), else the option columns."""
  items = _literal(row.extra.get("choices", ""))
  if isinstance(items, (list, tuple)) and items:
    return {chr(65 + i): str(v) for i, v in enumerate(items)}
  return options_of(row)


def question_type(row: Row) -> str:
  """'multi_choice' or 'free_form'; a file without the column: multi_choice when it has choices."""
  return row.extra.get("question_type") or ("multi_choice" if choices_of(row) else "free_form")


def answer_type(row: Row) -> str:
  """'text' (multiple choice), 'integer', 'float' or 'list'; a file without the column: from the
  reference's own form."""
  kind = row.extra.get("answer_type")
  if kind:
    return kind
  if question_type(row) == "multi_choice":
    return "text"
  ans = row.answer
  if isinstance(ans, list) or str(ans).strip().startswith("["):
    return "list"
  for name, parse in (("integer", int), ("float", float)):
    try:
      parse(str(ans))
      return name
    except ValueError:
      pass
  return "text"


def answer_option(row: Row) -> str:
  """The reference letter of a multiple-choice row: VLMEvalKit's `answer_option`, else (the HF
  dataset, whose `answer` is the choice's text) the letter of the choice equal to the answer."""
  if row.extra.get("answer_option"):
    return row.extra["answer_option"].strip()
  ans = str(row.answer).strip()
  for k, v in choices_of(row).items():
    if v.strip() == ans:
      return k
  return ans if len(ans) == 1 and ans.isupper() else ""


def check(row: Row, prediction: str) -> tuple[Any, bool, bool]:
  """(what the rules read from the answer or None, whether the rules resolved it, whether it is
  right) (post_check): a multiple-choice answer is resolved when can_infer finds a letter (or
  'Z'), right or wrong; a number only when it equals the reference (else VLMEvalKit asks the
  judge)."""
  if question_type(row) == "multi_choice":
    letter = can_infer(prediction, choices_of(row))
    return (letter or None), bool(letter), letter == answer_option(row)
  parse = {"integer": int, "float": float}.get(answer_type(row))
  if parse is None:  # list / text: post_check compares str(None) with the reference
    return None, False, False
  try:
    got = parse(prediction)
  except ValueError:
    return None, False, False
  try:
    ok = got == parse(str(row.answer))
  except ValueError:
    ok = False
  return got, ok, ok


def task_of(row: Row) -> str:
  return _field(row, "task") or row.category


def skills_of(row: Row) -> list[str]:
  """MathVista_acc: eval of the `skills` cell (a list), else the cell as one skill."""
  raw = _field(row, "skills")
  if not raw:
    return []
  value = _literal(raw)
  if isinstance(value, (list, tuple)):
    return [str(s) for s in value]
  return [raw]


def score_mathvista(rows: Sequence[Row], preds: Sequence[str],
                    judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """Accuracy and prefetch rate overall, per task and per skill (MathVista_acc). With a judge,
  an answer the rules cannot resolve is extracted by it (MathVista_auxeval, up to 5 tries) and
  the extraction is checked by the same rules; without one it counts as wrong."""
  checked = [check(r, p) for r, p in zip(rows, preds)]
  judged: dict[int, tuple[str | None, int]] = {}
  if judge is not None:
    ask = [i for i, (_, resolved, _) in enumerate(checked) if not resolved]
    replies = judge.map(lambda i: judge.first_usable(
        bench_judge.mathvista_prompt(rows[i].question, preds[i]), lambda _: True,
        max_tokens=bench_judge.MATHVISTA_MAX_TOKENS), ask)
    judged = dict(zip(ask, replies))
  right, read, per_row = [], [], []
  groups: dict[str, list[int]] = collections.defaultdict(list)
  tasks, skills = set(), set()
  for i, (r, p) in enumerate(zip(rows, preds)):
    got, resolved, ok = checked[i]
    entry: dict[str, Any] = {}
    if i in judged:
      reply, tries = judged[i]
      entry = {"judge": reply, "judge_tries": tries}
      got, ok = (None, False) if reply is None else check(r, reply)[::2]
    right.append(float(ok))
    read.append(float(resolved))
    task = task_of(r)
    if task:
      groups[task].append(i)
      tasks.add(task)
    for s in skills_of(r):
      groups[s].append(i)
      skills.add(s)
    mc = question_type(r) == "multi_choice"
    per_row.append({"index": r.index, "prediction": p, "extracted": got, "resolved": resolved,
                    "answer": answer_option(r) if mc else r.answer,
                    "question_type": question_type(r), "answer_type": answer_type(r),
                    "correct": ok, **entry})

  def metrics(members: Sequence[int]) -> dict[str, Any]:
    n = len(members)
    return {"accuracy": sum(right[i] for i in members) / n if n else 0.0,
            "prefetch_rate": sum(read[i] for i in members) / n if n else 0.0, "count": n}

  order = sorted(tasks) + sorted(skills - tasks)
  return {"metrics": metrics(range(len(rows))),
          "categories": {g: metrics(groups[g]) for g in order}, "rows": per_row}
