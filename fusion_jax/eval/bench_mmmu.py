"""MMMU's rule-based answer parsing and scoring (no GPT judge).

The rules are the MMMU repository's eval/eval_utils.py (commit 51ce7f3), as lmms-eval copies them
(lmms_eval/tasks/mmmu/utils.py and _task_utils/mmmu_mcq_utils.py, commit 75571cf):
  * multiple choice: parse_multi_choice_response finds "(A)", then "A " (a letter between spaces),
    then "A."; in an answer of more than 5 words with no letter, an option's text; several
    candidates: the last one in the answer; none: a random choice among the options (MMMU's
    guess; here seeded with the row's index, so a run is reproducible).
  * open: parse_open_response takes the key parts of the answer (after "could be ", "so ", "is ",
    "thus ", "therefore ", "final ", "answer ", "result ", and "=" in the last sentence), adds
    the numbers in them, normalises (numbers rounded to 2 decimals, text lower-cased); eval_open:
    right when a normalised reference is among the parsed numbers or inside a parsed string.
  * accuracy per subject (the `id`'s middle part, "validation_Art_Theory_3" -> Art_Theory, else
    the category), per domain ("Overall-Art and Design", ...; lmms-eval DOMAIN_CAT2SUB_CAT) and
    overall, each over its questions (calculate_ins_level_acc).
One deliberate difference from lmms-eval at 75571cf: its mmmu_process_results keeps only the first
element of an open answer's parsed list, as a string, and eval_open then iterates that string's
characters, so an open question can never be right there; here eval_open gets the whole list, as
the MMMU repository's evaluation does.
"""
from __future__ import annotations

import collections
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fusion_jax.eval.bench_formats import Row
from fusion_jax.eval.bench_prompts import mmmu_is_open, options_of

DOMAINS = {
    "Art and Design": ("Art", "Art_Theory", "Design", "Music"),
    "Business": ("Accounting", "Economics", "Finance", "Manage", "Marketing"),
    "Science": ("Biology", "Chemistry", "Geography", "Math", "Physics"),
    "Health and Medicine": ("Basic_Medical_Science", "Clinical_Medicine",
                            "Diagnostics_and_Laboratory_Medicine", "Pharmacy", "Public_Health"),
    "Humanities and Social Science": ("History", "Literature", "Sociology", "Psychology"),
    "Tech and Engineering": ("Agriculture", "Architecture_and_Engineering", "Computer_Science",
                             "Electronics", "Energy_and_Power", "Materials",
                             "Mechanical_Engineering"),
}


def parse_multi_choice_response(response: str, all_choices: Sequence[str],
                                index2ans: Mapping[str, str], rng: random.Random | None = None
                                ) -> tuple[str, bool]:
  """(the chosen letter, whether it was a random guess) (MMMU parse_multi_choice_response)."""
  for ch in ",.!?;:'":
    response = response.strip(ch)
  response = f" {response} "
  by_text, bracketed = False, False
  cands = [c for c in all_choices if f"({c})" in response]
  bracketed = bool(cands)
  if not cands:
    cands = [c for c in all_choices if f"{c} " in response]
  if not cands:
    cands = [c for c in all_choices if f"{c}." in response]
  if not cands and len(response.split()) > 5:
    cands = [k for k, v in index2ans.items() if v.lower() in response.lower()]
    by_text = bool(cands)
  if not cands:
    return (rng or random).choice(list(all_choices)), True
  if len(cands) == 1:
    return cands[0], False
  if by_text:
    starts = [response.lower().rfind(index2ans[c].lower()) for c in cands]
  elif bracketed:
    starts = [response.rfind(f"({c})") for c in cands]
  else:
    starts = [response.rfind(f" {c} ") for c in cands]
  return cands[starts.index(max(starts))], False  # np.argmax: the first of equal maxima


def extract_numbers(text: str) -> list[str]:
  """Numbers with thousands commas, in scientific notation, and plain (MMMU extract_numbers)."""
  commas = re.findall(r"-?\b\d{1,3}(?:,\d{3})+\b", text)
  scientific = re.findall(r"-?\d+(?:\.\d+)?[eE][+-]?\d+", text)
  simple = re.findall(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])", text)
  return commas + scientific + simple


def check_is_number(text: str) -> bool:
  try:
    float(text.replace(",", ""))
    return True
  except ValueError:
    return False


def normalize_str(text: str) -> list[str | float]:
  """A number -> [it rounded to 2 decimals]; text -> [it lower-cased], a single character padded
  with a space on either side (" x", "x ") so it does not match inside words (MMMU)."""
  text = text.strip()
  if check_is_number(text):
    return [round(float(text.replace(",", "")), 2)]
  text = text.lower()
  return [" " + text, text + " "] if len(text) == 1 else [text]


_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ",
                   "result ")


def _key_subresponses(response: str) -> list[str]:
  response = response.strip().strip(".").lower()
  subs = re.split(r"\.\s(?=[A-Z])|\n", response)
  keys = []
  for i, sub in enumerate(subs):
    indicators = _KEY_INDICATORS + (("=",) if i == len(subs) - 1 else ())
    shortest = None
    for ind in indicators:
      if ind in sub:
        tail = sub.split(ind)[-1].strip()
        if not shortest or len(tail) < len(shortest):
          shortest = tail
    if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
      keys.append(shortest)
  return keys or [response]


def parse_open_response(response: str) -> list[str | float]:
  """The normalised candidate answers of an open response (MMMU parse_open_response)."""
  keys = _key_subresponses(response)
  preds: list[Any] = list(keys)
  for k in keys:
    preds += extract_numbers(k)
  out: list[str | float] = []
  for p in preds:
    out += normalize_str(p)
  return list(dict.fromkeys(out))  # MMMU: list(set(...)); the order does not matter to eval_open


def eval_open(gold: str | Sequence[str], preds: Sequence[str | float]) -> bool:
  """MMMU eval_open: a normalised reference string inside a parsed string, or a reference
  number equal to a parsed number."""
  golds = [gold] if isinstance(gold, str) else list(gold)
  norm = [n for g in golds for n in normalize_str(str(g))]
  for p in preds:
    if isinstance(p, str):
      if any(isinstance(n, str) and n in p for n in norm):
        return True
    elif p in norm:
      return True
  return False


def subject_of(row: Row) -> str:
  """MMMU's subject: lmms-eval's extract_subset_name of the `id` ("validation_Art_Theory_3"),
  else the category (VLMEvalKit's TSV; "Art Theory" read as Art_Theory)."""
  m = re.match(r"^[^_]+_(.+?)_\d+$", row.extra.get("id", ""))
  if m:
    return m.group(1)
  return row.category.strip().replace(" ", "_") or "all"


def score_mmmu(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """MMMU accuracy overall, per subject and per domain; `multi_image`: rows that had more than
  one image (asked with the first only); `random_guesses`: multiple-choice answers that no rule
  resolved (MMMU then guesses)."""
  right, per_row, guesses = [], [], 0
  for r, p in zip(rows, preds):
    if mmmu_is_open(r):
      parsed: Any = parse_open_response(p)
      ok = eval_open(r.answer, parsed)
      guessed = False
    else:
      opts = options_of(r)
      parsed, guessed = parse_multi_choice_response(p, list(opts), opts,
                                                    random.Random(f"mmmu {r.index}"))
      gold = [r.answer] if isinstance(r.answer, str) else list(r.answer)
      ok = parsed in [str(g).strip() for g in gold]
    guesses += guessed
    right.append(float(ok))
    per_row.append({"index": r.index, "prediction": p, "parsed": parsed, "answer": r.answer,
                    "open": mmmu_is_open(r), "random_guess": guessed, "correct": ok})
  subjects = [subject_of(r) for r in rows]
  by_subject: dict[str, list[float]] = collections.defaultdict(list)
  for s, v in zip(subjects, right):
    by_subject[s].append(v)

  def metrics(vals: Sequence[float]) -> dict[str, Any]:
    return {"accuracy": sum(vals) / len(vals) if vals else 0.0, "count": len(vals)}

  cats: dict[str, dict[str, Any]] = {}
  for domain, subs in DOMAINS.items():
    vals = [v for s in subs for v in by_subject.get(s, [])]
    if vals:
      cats[f"Overall-{domain}"] = metrics(vals)
      cats.update({s: metrics(by_subject[s]) for s in subs if s in by_subject})
  known = {s for subs in DOMAINS.values() for s in subs}
  cats.update({s: metrics(v) for s, v in sorted(by_subject.items()) if s not in known})
  overall = metrics(right)
  overall.update(multi_image=sum(r.image_count > 1 for r in rows), random_guesses=guesses)
  return {"metrics": overall, "categories": cats, "rows": per_row}
