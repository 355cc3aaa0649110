"""Official benchmark metrics on (row, prediction) pairs, and the answer extraction they use.

Every scorer returns {"metrics": overall, "categories": {name: metrics}, "rows": per-row
records}; each metrics dict carries `count` (rows scored). Sources of each rule:
  * multiple choice (MMBench, ScienceQA_IMG, MMVP, CV-Bench): `extract_choice` = the letter at
    the start ("A", "(A)", "A.", lmms-eval cv_bench/mmvp utils._extract_answer_letter), else
    VLMEvalKit's `can_infer`: can_infer_option (exactly one option letter standing as a word,
    among the last four words; or "answer is X") then can_infer_text (exactly one option text
    inside an answer at most twice as long as the option texts) (vlmeval/utils/matching_util.py;
    an answer none of these resolves is wrong, or, with --judge_url, read by VLMEvalKit's judge:
    bench_mcq_judge.py). MMBench circular evaluation (VLMEvalKit mcq_circular_eval): a question
    counts only when every rotation of its options is answered right.
  * POPE: yes/no by VLMEvalKit's YOrN_Extraction (and, with --judge_url, its judge for answers
    read as neither: `read_yes_no`, as for MME and HallusionBench); accuracy, precision /
    recall / F1 of "yes", and yes-ratio = the share of answers that are "yes" (POPE's and
    LLaVA's eval_pope.py; note lmms-eval's pope_yes_ratio counts the ground truth instead).
  * MME: per subtask acc = % questions right, acc+ = % images with both questions right, score =
    acc + acc+; perception / cognition = sums over the official subtask split (VLMEvalKit
    MME_rating; lmms-eval mme/utils.py eval_type_dict).
  * TextVQA: VQA accuracy, min(#matching humans / 3, 1) averaged over the 10 leave-one-out
    subsets of the human answers, after the EvalAI answer normalisation (`normalize_vqa`,
    lmms-eval _task_utils/vqa_eval_metric.py, from facebookresearch/mmf).
  * GQA: exact match, case and punctuation ignored (lmms-eval gqa.yaml exact_match).
  * MMVP: per-question accuracy and pair accuracy (rows 2i and 2i+1 of the file both right;
    VLMEvalKit report_acc_MMVP).
  * CV-Bench: accuracy; with sources ADE20K, COCO and Omni3D present also the official overall
    ((ADE20K + COCO) / 2 + Omni3D) / 2 (lmms-eval cv_bench_default_aggregate_results).
  * OCRBench, ChartQA, DocVQA / InfoVQA: bench_ocr.py.
  * VizWiz: VQA accuracy as TextVQA (lmms-eval vizwiz_vqa/utils.py vizwiz_vqa_process_results).
  * RealWorldQA, HallusionBench, MME-RealWorld: bench_realworld.py.
  * MMMU: bench_mmmu.py.
  * MathVista: bench_mathvista.py (VLMEvalKit's rule check; its judge step with --judge_url).
Sources: lmms-eval (github.com/EvolvingLMMs-Lab/lmms-eval) commit 75571cf, lmms_eval/...;
VLMEvalKit (github.com/open-compass/VLMEvalKit) commit e8e78f0, vlmeval/...
"""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Mapping, Sequence
from typing import Any

from fusion_jax.eval import bench_judge
from fusion_jax.eval.bench_formats import CIRCULAR_OFFSET, Row, group_index
from fusion_jax.eval.bench_prompts import options_of

# ---------------------------------------------------------------- EvalAI answer normalisation
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
            "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(?<=\d)(\,)+(?=\d)")
_PUNCT = (";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@",
          "`", ",", "?", "!")


def _process_punctuation(text: str) -> str:
  out = text
  for p in _PUNCT:
    if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD_STRIP.sub("", out)


def normalize_vqa(text: str) -> str:
  """EvalAI's VQA answer normalisation: case, punctuation, number words, articles,
  contractions (lmms-eval EvalAIAnswerProcessor.__call__)."""
  text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
  text = text.replace("\n", " ").replace("\t", " ").strip()
  text = _process_punctuation(text)
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
  return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
  """VQA accuracy of one prediction against the human answers (10 for TextVQA)."""
  answers = [answers] if isinstance(answers, str) else list(answers)
  pred = normalize_vqa(prediction)
  gts = [normalize_vqa(a) for a in answers]
  if len(gts) == 1:  # a single reference: plain normalised match
    return float(pred == gts[0])
  accs = []
  for i in range(len(gts)):
    others = gts[:i] + gts[i + 1:]
    accs.append(min(1.0, sum(o == pred for o in others) / 3.0))
  return sum(accs) / len(accs)


# ---------------------------------------------------------------- answer extraction
def yes_no(text: str) -> str:
  """'yes', 'no' or 'unknown' (VLMEvalKit YOrN_Extraction: exactly one of the two words)."""
  words = _process_punctuation(text.lower()).split()
  if "yes" in words and "no" not in words:
    return "yes"
  if "no" in words and "yes" not in words:
    return "no"
  return "unknown"


def read_yes_no(rows: Sequence[Row], preds: Sequence[str],
                judge: bench_judge.Judge | None = None
                ) -> tuple[list[str], dict[int, dict[str, Any]]]:
  """(each answer as 'yes' / 'no' / 'unknown', {row: its judge entry}): `yes_no`, then, with a
  judge, VLMEvalKit's YOrN_auxeval for the answers read as neither (ImageYORNDataset.evaluate:
  MME, POPE, HallusionBench): YOrN_match_prompt, up to 5 tries, a reply that reads as yes or
  no wins."""
  said = [yes_no(p) for p in preds]
  if judge is None:
    return said, {}
  ask = [i for i, s in enumerate(said) if s == "unknown"]
  replies = judge.map(lambda i: judge.first_usable(
      bench_judge.yes_no_prompt(rows[i].question, preds[i]),
      lambda reply: yes_no(reply) != "unknown"), ask)
  for i, (reply, _) in zip(ask, replies):
    said[i] = "unknown" if reply is None else yes_no(reply)
  return said, {i: {"judge": reply, "judge_tries": tries}
                for i, (reply, tries) in zip(ask, replies)}


# vlmeval/utils/matching_util.py
_REJECTIONS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
               "I'm sorry, but without the image provided", "Cannot determine the answer")
_VERBOSE_ANSWER = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def can_infer_option(answer: str, choices: Mapping[str, str]) -> str | bool:
  """VLMEvalKit can_infer_option: the option letter when exactly one letter stands as a word and
  it is among the last four words, 'Z' for a refusal, else the letter after "answer is" (A-D,
  any case, as its regex); False when none applies. (Its extra 'A may be a quantifier' check
  runs only with VERBOSE set, so not here.)"""
  if "Failed to obtain answer via API" in answer:
    return False
  if any(r in answer for r in _REJECTIONS):
    return "Z"
  mod = answer
  for c in ".()[],:;!*#{}":
    mod = mod.replace(c, " ")
  splits = [x.strip() for x in mod.split()]
  count = sum(c in splits for c in choices)
  if count == 1:
    for ch in choices:
      if ch in splits and splits.index(ch) > len(splits) - 5:
        return ch
  elif count == 0 and "Z" in splits:
    return "Z"
  m = _VERBOSE_ANSWER.search(answer or "")
  if m and m.group(1).upper() in choices:
    return m.group(1).upper()
  return False


def can_infer_text(answer: str, choices: Mapping[str, str]) -> str | bool:
  """VLMEvalKit can_infer_text: the one option whose text (lower-cased) is inside the answer; an
  answer over twice as long as all option texts together is not read."""
  answer = answer.lower()
  if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
    return False
  cands = [k for k, v in choices.items() if str(v).lower() in answer]
  return cands[0] if len(cands) == 1 else False


def can_infer(answer: Any, choices: Mapping[str, str]) -> str | bool:
  """VLMEvalKit can_infer: the option letter (or 'Z') of an answer, else False."""
  answer = str(answer)
  return can_infer_option(answer, choices) or can_infer_text(answer, choices)


_LEADING_LETTER = re.compile(r"^[\(\s]*([A-Za-z])(?:[\)\.:,]|\s|$)")


def extract_choice(prediction: str, options: Mapping[str, str]) -> str:
  """The option letter an answer picks, or '' (see the module docstring): the letter at the
  start, else VLMEvalKit's `can_infer`."""
  text = prediction.strip()
  letters = list(options) or list("ABCD")
  m = _LEADING_LETTER.match(text)
  if m and m.group(1).upper() in letters and (m.group(1).isupper() or len(text) <= 3):
    return m.group(1).upper()
  letter = can_infer(text, options or {c: "" for c in letters})
  return letter if letter and letter in letters else ""


def answer_letter(row: Row) -> str:
  """The reference option letter of a multiple-choice row ('(c)', 'C' or the option text)."""
  ans = str(row.answer).strip()
  bare = ans.strip("()").strip()
  if len(bare) == 1 and bare.upper() in string.ascii_uppercase:
    return bare.upper()
  for k, v in options_of(row).items():
    if v.strip().lower() == ans.lower():
      return k
  return ans.upper()


def exact_match(prediction: str, reference: str) -> float:
  """lmms-eval exact_match with ignore_case and ignore_punctuation (GQA)."""
  table = str.maketrans("", "", string.punctuation)
  return float(prediction.lower().translate(table).strip()
               == str(reference).lower().translate(table).strip())


# ---------------------------------------------------------------- aggregation
def mean(xs: Sequence[float]) -> float:
  return sum(xs) / len(xs) if xs else 0.0


def _by_category(rows: Sequence[Row], values: Sequence[Any]
                 ) -> dict[str, list[tuple[Row, Any]]]:
  out: dict[str, list[tuple[Row, Any]]] = collections.defaultdict(list)
  for r, v in zip(rows, values):
    for cat in (r.category or "all").split(","):  # POPE rows may name several categories
      out[cat.strip()].append((r, v))
  return dict(sorted(out.items()))


def accuracy_report(rows: Sequence[Row], correct: Sequence[float], per_row: list[dict],
                     key: str = "accuracy") -> dict[str, Any]:
  cats = {c: {key: mean([v for _, v in items]), "count": len(items)}
          for c, items in _by_category(rows, correct).items()}
  return {"metrics": {key: mean(correct), "count": len(rows)}, "categories": cats,
          "rows": per_row}


def score_multiple_choice(rows: Sequence[Row], preds: Sequence[str], *, circular: bool = False,
                          judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """Accuracy; circular: per question (group of rotations), right only if all rotations are.
  Answers by `extract_choice`, then by `judge` where it reads none (bench_mcq_judge)."""
  from fusion_jax.eval.bench_mcq_judge import read_choices  # (it imports this module)
  reads = read_choices(rows, preds, judge, circular=circular)
  right = [float(x["extracted"] == answer_letter(r)) for r, x in zip(rows, reads)]
  per_row = [{"index": r.index, "prediction": p, **x, "answer": answer_letter(r),
              "correct": bool(c)} for r, p, x, c in zip(rows, preds, reads, right)]
  if not circular:
    return accuracy_report(rows, right, per_row)
  groups: dict[str, list[float]] = collections.defaultdict(list)
  main: dict[str, Row] = {}
  for r, c in zip(rows, right):
    g = group_index(r)
    groups[g].append(c)
    if g not in main or r.index == g:
      main[g] = r
  heads = [main[g] for g in groups]
  hits = [float(all(groups[g])) for g in groups]
  rep = accuracy_report(heads, hits, per_row)
  rep["metrics"].update(count=len(rows), questions=len(groups))
  for c, items in _by_category(heads, hits).items():
    rep["categories"][c].update(questions=len(items),
                                count=sum(len(groups[group_index(r)]) for r, _ in items))
  return rep


def circular_rows(rows: Sequence[Row]) -> list[Row]:
  """rows plus, for every question without circular copies in the file, its N-1 rotations
  (option k of rotation j holds original option (k + j) % N; index + j * 1e6 as VLMEvalKit)."""
  have = collections.Counter(group_index(r) for r in rows)
  out = list(rows)
  for r in rows:
    opts = options_of(r)
    if have[group_index(r)] > 1 or len(opts) < 2:
      continue
    letters, texts = list(opts), list(opts.values())
    ans = letters.index(answer_letter(r)) if answer_letter(r) in letters else -1
    for j in range(1, len(letters)):
      new = {letters[k]: texts[(k + j) % len(texts)] for k in range(len(letters))}
      try:
        idx = str(int(r.index) + j * CIRCULAR_OFFSET)
      except ValueError:
        idx = f"{r.index}#rot{j}"
      answer = letters[(ans - j) % len(letters)] if ans >= 0 else r.answer
      out.append(Row(**{**r.__dict__, "index": idx, "options": new, "answer": answer}))
  return out


def score_pope(rows: Sequence[Row], preds: Sequence[str],
               judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """POPE accuracy, precision, recall, F1 and yes-ratio, overall and per category (answers by
  `read_yes_no`)."""
  said, judged = read_yes_no(rows, preds, judge)
  truth = [yes_no(str(r.answer)) for r in rows]

  def metrics(items: Sequence[tuple[str, str]]) -> dict[str, float]:
    tp = sum(s == "yes" and t == "yes" for s, t in items)
    fp = sum(s == "yes" and t == "no" for s, t in items)
    fn = sum(s != "yes" and t == "yes" for s, t in items)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": mean([float(s == t) for s, t in items]), "precision": prec,
            "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
            "yes_ratio": mean([float(s == "yes") for s, _ in items]), "count": len(items)}

  pairs = list(zip(said, truth))
  cats = {c: metrics([v for _, v in items]) for c, items in _by_category(rows, pairs).items()}
  per_row = [{"index": r.index, "prediction": p, "extracted": s, "answer": t,
              "correct": s == t, **judged.get(i, {})}
             for i, (r, p, s, t) in enumerate(zip(rows, preds, said, truth))]
  return {"metrics": metrics(pairs), "categories": cats, "rows": per_row}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")


def score_mme(rows: Sequence[Row], preds: Sequence[str],
              judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """MME acc / acc+ / score per subtask; perception and cognition totals (answers by
  `read_yes_no`).

  acc+ counts images whose questions are all present (two in MME) and all right.
  """
  said, judged = read_yes_no(rows, preds, judge)
  right = [float(s == yes_no(str(r.answer))) for r, s in zip(rows, said)]
  cats: dict[str, dict[str, float]] = {}
  for c, items in _by_category(rows, right).items():
    images: dict[str, list[float]] = collections.defaultdict(list)
    for r, v in items:
      images[r.image_key].append(v)
    pairs = [all(v) for v in images.values() if len(v) >= 2]
    acc = 100.0 * mean([v for _, v in items])
    acc_plus = 100.0 * mean([float(p) for p in pairs])
    cats[c] = {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus,
               "count": len(items), "pairs": len(pairs)}
  perception = sum(v["score"] for c, v in cats.items() if c in MME_PERCEPTION)
  cognition = sum(v["score"] for c, v in cats.items() if c in MME_COGNITION)
  per_row = [{"index": r.index, "prediction": p, "extracted": s,
              "answer": yes_no(str(r.answer)), "correct": bool(c), **judged.get(i, {})}
             for i, (r, p, s, c) in enumerate(zip(rows, preds, said, right))]
  return {"metrics": {"perception": perception, "cognition": cognition,
                      "total": perception + cognition, "accuracy": mean(right),
                      "count": len(rows)},
          "categories": cats, "rows": per_row}


def score_vqa(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """TextVQA: mean VQA accuracy."""
  accs = [vqa_accuracy(p, r.answer) for r, p in zip(rows, preds)]
  per_row = [{"index": r.index, "prediction": p, "normalized": normalize_vqa(p),
              "answers": r.answer, "score": a} for r, p, a in zip(rows, preds, accs)]
  return accuracy_report(rows, accs, per_row, key="vqa_accuracy")


def score_exact(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """GQA: exact match accuracy (case and punctuation ignored)."""
  right = [exact_match(p, str(r.answer)) for r, p in zip(rows, preds)]
  per_row = [{"index": r.index, "prediction": p, "answer": r.answer, "correct": bool(c)}
             for r, p, c in zip(rows, preds, right)]
  return accuracy_report(rows, right, per_row)


def ai2d_letter(row: Row) -> str:
  """AI2D's reference letter: lmms-lab's `answer` is the option's index ('0'..), VLMEvalKit's
  TSV has the letter."""
  ans = str(row.answer).strip()
  opts = options_of(row)
  if ans.isdigit() and int(ans) < len(opts):
    return list(opts)[int(ans)]
  return answer_letter(row)


def score_ai2d(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """AI2D as lmms-eval scores it: the answer must be the option letter (exact_match, case and
  punctuation ignored); `accuracy_extracted` also credits an answer that names the letter or
  the option in more words (as MMBench's extraction)."""
  letters = [ai2d_letter(r) for r in rows]
  right = [exact_match(p, k) for p, k in zip(preds, letters)]
  extracted = [extract_choice(p, options_of(r)) for r, p in zip(rows, preds)]
  per_row = [{"index": r.index, "prediction": p, "extracted": e, "answer": k, "correct": bool(c)}
             for r, p, e, k, c in zip(rows, preds, extracted, letters, right)]
  rep = accuracy_report(rows, right, per_row)
  rep["metrics"]["accuracy_extracted"] = mean([float(e == k) for e, k in zip(extracted, letters)])
  return rep


def mmstar_match(prediction: str, letter: str) -> float:
  """MMStar's exact_match (lmms-eval mmstar/utils.py, from MMStar): the answer's first
  character is the letter, or follows '(', 'option ' or 'the answer is ' (case ignored)."""
  ans, pred = letter.lower().strip(), prediction.lower().strip().replace("\n", " ")
  for prefix in ("", "(", "option ", "the answer is "):
    if pred.startswith(prefix) and len(pred) > len(prefix) and pred[len(prefix)] == ans:
      return 1.0
  return 0.0


def score_mmstar(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """MMStar as lmms-eval aggregates it: `average` (the headline) is the mean over the 18
  l2-categories of their accuracy; each of the 6 categories reports the mean over its own
  l2-categories; `accuracy` is the plain mean over questions."""
  letters = [answer_letter(r) for r in rows]
  right = [mmstar_match(p, k) for p, k in zip(preds, letters)]
  l2 = [r.extra.get("l2-category") or r.extra.get("l2_category") or r.category or "all"
        for r in rows]
  per_row = [{"index": r.index, "prediction": p, "answer": k, "l2_category": c,
              "correct": bool(v)} for r, p, k, c, v in zip(rows, preds, letters, l2, right)]
  rep = accuracy_report(rows, right, per_row)

  def l2_mean(members: Sequence[int]) -> float:
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for i in members:
      groups[l2[i]].append(right[i])
    return mean([mean(v) for v in groups.values()])

  rep["metrics"]["average"] = l2_mean(range(len(rows)))
  by_cat: dict[str, list[int]] = collections.defaultdict(list)
  for i, r in enumerate(rows):
    by_cat[r.category or "all"].append(i)
  for cat, members in by_cat.items():
    rep["categories"][cat]["average"] = l2_mean(members)
  return rep


def seed_letter(prediction: str) -> str:
  """SEED-Bench's reading of an answer (lmms-eval seed_process_result): its first character
  after stripping, compared as is (case counts)."""
  return prediction.strip()[:1]


def score_seedbench(rows: Sequence[Row], preds: Sequence[str]) -> dict[str, Any]:
  """SEED-Bench accuracy as lmms-eval scores it: the answer's first character must be the
  option letter; per category (the question type) too."""
  letters = [answer_letter(r) for r in rows]
  right = [float(seed_letter(p) == k) for p, k in zip(preds, letters)]
  per_row = [{"index": r.index, "prediction": p, "answer": k, "correct": bool(v)}
             for r, p, k, v in zip(rows, preds, letters, right)]
  return accuracy_report(rows, right, per_row)


def score_mmvp(rows: Sequence[Row], preds: Sequence[str],
               judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """MMVP accuracy and pair accuracy (file rows 2i, 2i+1 both right; incomplete pairs out)."""
  rep = score_multiple_choice(rows, preds, judge=judge)
  pairs: dict[int, list[bool]] = collections.defaultdict(list)
  cat_of: dict[int, str] = {}
  for r, pr in zip(rows, rep["rows"]):
    pairs[r.position // 2].append(pr["correct"])
    cat_of[r.position // 2] = r.category or "all"
  full = {k: all(v) for k, v in pairs.items() if len(v) == 2}
  rep["metrics"].update(pair_accuracy=mean([float(v) for v in full.values()]), pairs=len(full))
  for c in rep["categories"]:
    mine = [float(v) for k, v in full.items() if cat_of[k] == c]
    rep["categories"][c].update(pair_accuracy=mean(mine), pairs=len(mine))
  return rep


CV_BENCH_SOURCES = ("ADE20K", "COCO", "Omni3D")


def score_cv_bench(rows: Sequence[Row], preds: Sequence[str],
                   judge: bench_judge.Judge | None = None) -> dict[str, Any]:
  """CV-Bench accuracy per task; the official 2D/3D-balanced overall when sources allow."""
  rep = score_multiple_choice(rows, preds, judge=judge)
  by_source: dict[str, list[float]] = collections.defaultdict(list)
  for r, pr in zip(rows, rep["rows"]):
    by_source[r.extra.get("source", "")].append(float(pr["correct"]))
  if all(by_source.get(s) for s in CV_BENCH_SOURCES):
    acc = {s: mean(by_source[s]) for s in CV_BENCH_SOURCES}
    rep["metrics"]["accuracy_2d"] = (acc["ADE20K"] + acc["COCO"]) / 2
    rep["metrics"]["accuracy_3d"] = acc["Omni3D"]
    rep["metrics"]["overall"] = (rep["metrics"]["accuracy_2d"] + acc["Omni3D"]) / 2
  return rep
