"""Benchmark metrics against hand-computed values on fixed predictions (no model)."""
import pytest

from fusion_jax.eval import bench_metrics as bm
from fusion_jax.eval.bench_formats import Row

OPTS = {"A": "apple", "B": "dog", "C": "banana", "D": "cat"}


def _mc(index, answer, category="X", **kw):
  return Row(index=str(index), question=f"q{index}?", answer=answer, category=category,
             options=dict(kw.pop("options", OPTS)), **kw)


def test_extract_choice_like_lmms_eval_and_vlmevalkit():
  two = {"A": "apple", "B": "pear"}
  assert bm.extract_choice("A", OPTS) == "A"
  assert bm.extract_choice("(B)", OPTS) == "B"
  assert bm.extract_choice("B. dog", OPTS) == "B"
  assert bm.extract_choice("c", OPTS) == "C"
  assert bm.extract_choice("The answer is C.", OPTS) == "C"
  assert bm.extract_choice("It is an apple", two) == "A"         # option text
  assert bm.extract_choice("apple or pear", two) == ""           # two option texts
  assert bm.extract_choice("I do not know", two) == ""
  assert bm.extract_choice("E", OPTS) == ""                      # not an option


def test_mmbench_accuracy_per_category():
  rows = [_mc(1, "A"), _mc(2, "B"), _mc(3, "C", "Y"), _mc(4, "D", "Y")]
  preds = ["A", "(B) dog", "I think it is a banana", "B"]
  rep = bm.score_multiple_choice(rows, preds)
  assert rep["metrics"] == {"accuracy": 0.75, "count": 4}
  assert rep["categories"] == {"X": {"accuracy": 1.0, "count": 2},
                               "Y": {"accuracy": 0.5, "count": 2}}
  assert [r["extracted"] for r in rep["rows"]] == ["A", "B", "C", "B"]


def test_circular_rotations_and_circular_accuracy():
  rows = bm.circular_rows([_mc(1, "B"), _mc(2, "D", "Y")])
  assert len(rows) == 8
  rot1 = next(r for r in rows if r.index == "1000001")
  # rotation 1: A holds the old B ("dog"), the right answer moves from B to A
  assert rot1.options == {"A": "dog", "B": "banana", "C": "cat", "D": "apple"}
  assert bm.answer_letter(rot1) == "A"
  for r in rows:
    assert r.options[bm.answer_letter(r)] == OPTS[{"1": "B", "2": "D"}[str(int(r.index) % 10**6)]]
  # question 1 right in every rotation; question 2 wrong in one rotation
  preds = [bm.answer_letter(r) if r.index != "3000002" else "B" for r in rows]
  rep = bm.score_multiple_choice(rows, preds, circular=True)
  assert rep["metrics"] == {"accuracy": 0.5, "count": 8, "questions": 2}
  assert rep["categories"]["X"] == {"accuracy": 1.0, "count": 4, "questions": 1}
  assert rep["categories"]["Y"] == {"accuracy": 0.0, "count": 4, "questions": 1}
  # vanilla accuracy on the same answers: 7 of 8 rows
  assert bm.score_multiple_choice(rows, preds)["metrics"]["accuracy"] == 7 / 8


def test_pope_precision_recall_f1_yes_ratio():
  truth = ["yes", "yes", "no", "no", "yes", "no"]
  preds = ["Yes", "No", "no", "yes", "Yes, there is a dog.", "No."]
  cats = ["adversarial"] * 4 + ["random"] * 2
  rows = [Row(str(i), "Is there a dog?", t.capitalize(), c)
          for i, (t, c) in enumerate(zip(truth, cats))]
  rep = bm.score_pope(rows, preds)
  m = rep["metrics"]
  assert m["count"] == 6
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["precision"] == pytest.approx(2 / 3)  # TP 2, FP 1
  assert m["recall"] == pytest.approx(2 / 3)     # TP 2, FN 1
  assert m["f1"] == pytest.approx(2 / 3)
  assert m["yes_ratio"] == pytest.approx(0.5)    # 3 of 6 answers are yes
  adv = rep["categories"]["adversarial"]
  assert (adv["accuracy"], adv["precision"], adv["recall"], adv["f1"]) == (0.5, 0.5, 0.5, 0.5)
  rnd = rep["categories"]["random"]
  assert (rnd["accuracy"], rnd["precision"], rnd["recall"], rnd["f1"], rnd["yes_ratio"]) == (
      1.0, 1.0, 1.0, 1.0, 0.5)


def test_mme_acc_acc_plus_and_totals():
  def row(i, img, cat, ans):
    return Row(str(i), "Is it? Please answer yes or no.", ans, cat, image_key=img)
  rows = [row(0, "a", "existence", "Yes"), row(1, "a", "existence", "No"),
          row(2, "b", "existence", "Yes"), row(3, "b", "existence", "No"),
          row(4, "c", "code_reasoning", "Yes"), row(5, "c", "code_reasoning", "No")]
  preds = ["Yes", "no", "Yes", "Yes", "yes", "No."]
  rep = bm.score_mme(rows, preds)
  ex = rep["categories"]["existence"]
  assert (ex["acc"], ex["acc_plus"], ex["score"]) == (75.0, 50.0, 125.0)  # 3/4 right, 1/2 images
  assert rep["categories"]["code_reasoning"]["score"] == 200.0
  assert rep["metrics"]["perception"] == 125.0
  assert rep["metrics"]["cognition"] == 200.0
  assert rep["metrics"]["total"] == 325.0
  assert rep["metrics"]["count"] == 6


def test_evalai_normalisation():
  assert bm.normalize_vqa("The Dogs!") == "dogs"
  assert bm.normalize_vqa("ten") == "10"
  assert bm.normalize_vqa("1,000") == "1000"
  assert bm.normalize_vqa("dont") == "don't"
  assert bm.normalize_vqa("coca-cola") == "coca cola"
  assert bm.normalize_vqa("Stop.") == "stop"
  assert bm.normalize_vqa("3.5") == "3.5"


def test_textvqa_vqa_accuracy_leave_one_out():
  rows = [Row("0", "what?", ["stop", "stop", "STOP"] + ["stop sign"] * 7),
          Row("1", "how many?", ["2"] + ["3"] * 9),
          Row("2", "what animal?", ["dog"] * 10)]
  preds = ["Stop.", "two", "a dog"]
  # row 0: 3 subsets without a 'stop' see 2 matches (2/3), 7 see 3 (1): (3 * 2/3 + 7) / 10
  # row 1: the subset without the '2' sees 0 matches, 9 see 1 (1/3): 9 * 1/3 / 10
  expected = [0.9, 0.3, 1.0]
  for r, p, e in zip(rows, preds, expected):
    assert bm.vqa_accuracy(p, r.answer) == pytest.approx(e)
  rep = bm.score_vqa(rows, preds)
  assert rep["metrics"]["vqa_accuracy"] == pytest.approx(sum(expected) / 3)
  assert rep["metrics"]["count"] == 3


def test_scienceqa_and_gqa_accuracy():
  two = {"A": "north", "B": "south"}
  rows = [_mc(0, "A", "natural", options=two), _mc(1, "B", "natural", options=two),
          _mc(2, "A", "social", options=two)]
  rep = bm.score_multiple_choice(rows, ["A", "B. south", "B"])
  assert rep["metrics"]["accuracy"] == pytest.approx(2 / 3)
  assert rep["categories"]["social"]["accuracy"] == 0.0
  gqa = [Row("0", "q", "yes"), Row("1", "q", "table"), Row("2", "q", "left")]
  rep = bm.score_exact(gqa, ["Yes.", "the table", "Left"])
  assert rep["metrics"]["accuracy"] == pytest.approx(2 / 3)  # articles are not removed


def test_mmvp_pair_accuracy():
  two = {"A": "open", "B": "closed"}
  answers = ["(a)", "(b)", "(a)", "(b)", "(a)", "(b)"]
  rows = [_mc(i + 1, a, "orientation", options=two, position=i) for i, a in enumerate(answers)]
  preds = ["A", "B", "A", "A", "B", "A"]  # pairs: both right, one right, none right
  rep = bm.score_mmvp(rows, preds)
  assert rep["metrics"]["accuracy"] == 0.5
  assert rep["metrics"]["pair_accuracy"] == pytest.approx(1 / 3)
  assert rep["metrics"]["pairs"] == 3
  # an incomplete pair (its partner row was skipped) is left out of pair accuracy
  rep = bm.score_mmvp(rows[:5], preds[:5])
  assert rep["metrics"]["pairs"] == 2 and rep["metrics"]["pair_accuracy"] == 0.5


def test_ai2d_exact_letter_like_lmms_eval():
  # lmms-lab's answer is the option index, VLMEvalKit's the letter; both mean the same row.
  rows = [_mc(0, "0"), _mc(1, "C"), _mc(2, "3", "Y"), _mc(3, "B", "Y")]
  preds = ["a.", "C", "The answer is D.", "dog"]
  rep = bm.score_ai2d(rows, preds)
  assert [r["answer"] for r in rep["rows"]] == ["A", "C", "D", "B"]
  assert rep["metrics"]["accuracy"] == 0.5  # only a bare letter counts, as exact_match
  assert rep["metrics"]["accuracy_extracted"] == 1.0
  assert rep["categories"]["Y"]["accuracy"] == 0.0


def test_mmstar_match_and_l2_average_like_lmms_eval():
  assert [bm.mmstar_match(p, "B") for p in
          ("B", "b) dog", "(B)", "Option B", "The answer is B.", "A", "", "answer: B")] == \
      [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
  spec = [("math", "geometry", "A", "A"), ("math", "geometry", "B", "A"),
          ("math", "statistical reasoning", "C", "C"),
          ("coarse perception", "image emotion", "D", "(D)")]
  rows = [_mc(i, ans, cat, extra={"l2-category": l2}) for i, (cat, l2, ans, _) in enumerate(spec)]
  rep = bm.score_mmstar(rows, [p for *_, p in spec])
  m = rep["metrics"]
  assert m["accuracy"] == 0.75
  assert m["average"] == (0.5 + 1.0 + 1.0) / 3  # the mean over l2-categories
  assert rep["categories"]["math"]["average"] == 0.75
  assert rep["categories"]["coarse perception"]["average"] == 1.0


def test_seedbench_first_character_like_lmms_eval():
  rows = [_mc(i, ans) for i, ans in enumerate("ABCD")]
  rep = bm.score_seedbench(rows, ["A", " B. dog", "c", "The answer is D"])
  assert [r["correct"] for r in rep["rows"]] == [True, True, False, False]
  assert rep["metrics"]["accuracy"] == 0.5


def test_cv_bench_accuracy_and_official_overall():
  two = {"A": "left", "B": "right"}
  spec = [("ADE20K", "Count", "(A)", "A"), ("ADE20K", "Count", "(A)", "B"),
          ("COCO", "Relation", "(B)", "(B)"), ("COCO", "Relation", "(A)", "A"),
          ("Omni3D", "Depth", "(A)", "A"), ("Omni3D", "Distance", "(B)", "A")]
  rows = [_mc(i, ans, task, options=two, extra={"source": src})
          for i, (src, task, ans, _) in enumerate(spec)]
  rep = bm.score_cv_bench(rows, [p for *_, p in spec])
  m = rep["metrics"]
  assert m["accuracy"] == pytest.approx(4 / 6)
  assert m["accuracy_2d"] == pytest.approx((0.5 + 1.0) / 2)
  assert m["accuracy_3d"] == pytest.approx(0.5)
  assert m["overall"] == pytest.approx((0.75 + 0.5) / 2)
  assert rep["categories"]["Count"]["accuracy"] == 0.5
