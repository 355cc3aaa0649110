"""Metrics of OCRBench, ChartQA, DocVQA / InfoVQA, VizWiz, RealWorldQA, HallusionBench,
MME-RealWorld, MMMU and MathVista against values worked out by hand from the official
definitions."""
import pytest

from fusion_jax.eval import bench_mathvista as mv
from fusion_jax.eval import bench_metrics as bm
from fusion_jax.eval import bench_mmmu as mmmu
from fusion_jax.eval import bench_ocr as ocr
from fusion_jax.eval import bench_realworld as rw
from fusion_jax.eval.bench_formats import Row


def test_ocrbench_substring_match_and_hme():
  assert ocr.ocrbench_hit("The text says HELLO.", ["Hello"]) == 1.0        # case folded
  assert ocr.ocrbench_hit("ＡＢＣ１２", ["abc12"]) == 1.0                 # fullwidth folded
  assert ocr.ocrbench_hit("may 12th", ["12 May", "May 12"]) == 1.0         # any reference
  assert ocr.ocrbench_hit("5.00", ["$5.00"]) == 0.0
  assert ocr.ocrbench_hit("line one\nline two", ["two line"]) == 0.0
  assert ocr.ocrbench_hit("line one\nline two", ["one line two"]) == 1.0  # newline = space
  # HME100k: every space removed, case kept
  assert ocr.ocrbench_hit("x ^ { 2 } + 1", ["x^{2}+1"], hme=True) == 1.0
  assert ocr.ocrbench_hit("X^{2}+1", ["x^{2}+1"], hme=True) == 0.0
  assert ocr.ocrbench_hit("x ^ { 2 } + 1", ["x^{2}+1"]) == 0.0             # spaces count elsewhere


def test_ocrbench_score_out_of_1000_and_groups():
  # the official composition: 6 x 50 recognition, 200 + 200 + 200 scene / doc / KIE, 100 HME
  sizes = {t: 50 for t in ocr.OCRBENCH_GROUPS["Text Recognition"]}
  sizes.update({"Scene Text-centric VQA": 200, "Doc-oriented VQA": 200,
                "Key Information Extraction": 200, ocr.OCRBENCH_HME: 100})
  right_per_type = {t: n // 2 for t, n in sizes.items()}  # half of each type answered right
  right_per_type["Regular Text Recognition"] = 50
  right_per_type[ocr.OCRBENCH_HME] = 10
  rows, preds = [], []
  for t, n in sizes.items():
    for i in range(n):
      rows.append(Row(f"{t}{i}", "What is written?", ["a+b"], t))
      preds.append("a + b" if i < right_per_type[t] else "nothing")
  rep = ocr.score_ocrbench(rows, preds)
  # "a+b" is inside "a + b" only once spaces are removed, which HME alone does
  hme = rep["categories"][ocr.OCRBENCH_HME]
  assert (hme["score"], hme["count"]) == (10, 100)
  assert rep["categories"]["Text Recognition"]["score"] == 0  # spaces kept outside HME
  rows = [Row(r.index, r.question, ["ab"], r.category) for r in rows]
  preds = [p.replace("a + b", "xAByz") for p in preds]
  rep = ocr.score_ocrbench(rows, preds)
  # outside HME every "right" answer holds "ab" once case is folded: 50 + 5 * 25 + 3 * 100;
  # HME keeps case ("ab" not in "xAByz"): 0
  assert rep["metrics"] == {"score": 475, "accuracy": 0.475, "count": 1000}
  assert list(rep["categories"]) == list(ocr.OCRBENCH_GROUPS)
  assert rep["categories"]["Text Recognition"] == {"score": 175, "accuracy": 175 / 300,
                                                   "count": 300}
  assert rep["categories"]["Doc-oriented VQA"]["score"] == 100
  assert rep["categories"][ocr.OCRBENCH_HME]["score"] == 0
  # lmms-eval's layout: question_type column and dataset HME100k
  hme_row = Row("1", "q", ["x"], extra={"question_type": ocr.OCRBENCH_HME, "dataset": "HME100k"})
  assert ocr.score_ocrbench([hme_row], [" x "])["categories"][ocr.OCRBENCH_HME]["score"] == 1


def test_chartqa_relaxed_accuracy():
  rc = ocr.relaxed_correctness
  assert rc("104.9", "100") and rc("95.1", "100")          # 4.9 % off
  assert not rc("105.1", "100") and not rc("94.9", "100")  # 5.1 % off
  assert rc("26%", "0.25") and rc("0.26", "25%")           # % divides by 100: 4 % off
  assert not rc("27%", "25%")                              # 8 % off
  assert rc("0", "0") and not rc("0.0", "0")               # a zero target: exact text
  assert rc("Yes", "yes") and not rc(" yes", "yes")        # case ignored, not stripped
  rows = [Row("0", "q", "12", extra={"type": "human_test"}),
          Row("1", "q", "Blue", extra={"type": "human_test"}),
          Row("2", "q", "0.5", extra={"type": "augmented_test"}),
          Row("3", "q", "7", extra={"type": "augmented_test"})]
  rep = ocr.score_chartqa(rows, ["12.5", "red", "0.52", "7"])
  assert rep["metrics"] == {"relaxed_overall": 0.75, "count": 4, "relaxed_human_split": 0.5,
                            "relaxed_augmented_split": 1.0}
  assert rep["categories"] == {"human": {"relaxed_overall": 0.5, "count": 2},
                               "augmented": {"relaxed_overall": 1.0, "count": 2}}
  # VLMEvalKit's `split` column names them too; no type at all: overall only
  assert ocr.chartqa_split(Row("0", "q", "1", extra={"split": "augmented"})) == "augmented"
  assert ocr.score_chartqa([Row("0", "q", "1")], ["1"])["categories"] == {}


def test_anls_threshold_and_best_reference():
  assert ocr.levenshtein("kitten", "sitting") == 3
  assert ocr.anls("hello wordl", ["hello world"]) == pytest.approx(1 - 2 / 11)  # near miss
  assert ocr.anls("Hello  World ", ["hello world"]) == 1.0   # case, whitespace runs ignored
  assert ocr.anls("abxy", ["abcd"]) == 0.5                   # exactly the threshold: kept
  assert ocr.anls("abxyz", ["abcde"]) == 0.0                 # 1 - 3/5 = 0.4 < 0.5
  assert ocr.anls("abxyz", ["abcde", "abxyw"]) == pytest.approx(0.8)  # the nearest reference
  rows = [Row("0", "q", ["hello world"], "form"), Row("1", "q", ["abcde"], "table")]
  rep = ocr.score_anls(rows, ["hello wordl", "abxyz"])
  assert rep["metrics"]["anls"] == pytest.approx((1 - 2 / 11) / 2)
  assert rep["categories"]["table"]["anls"] == 0.0


def test_vizwiz_vqa_accuracy_with_unanswerable():
  answers = ["unanswerable"] * 7 + ["blue"] * 3
  assert bm.vqa_accuracy("Unanswerable.", answers) == 1.0   # 6 or 7 matches in every subset
  # without a 'blue': 2 matches (2/3) in 3 subsets, 3 matches (1) in 7: (2 + 7) / 10
  assert bm.vqa_accuracy("Blue", answers) == pytest.approx(0.9)
  assert bm.vqa_accuracy("red", answers) == 0.0


def test_realworldqa_extraction_and_exact_match():
  ex = rw.extract_mcq_answer
  assert ex("B", "ABCD") == "B"
  assert ex("The answer is (B).", "ABCD") == "B"
  assert ex("I think C. But maybe A", "ABCD") == "A"  # ends with a standalone A: priority 9
  assert ex("(C) is wrong, (B) is right", "ABCD") == "B"  # two "(x)": the later one
  assert ex("Downhill", "ABCD") == "D"   # no format matched: any occurrence of a letter
  assert ex("no idea", "ABCD") == ""
  rows = [Row("0", "q", "B"), Row("1", "q", "3"), Row("2", "q", "Downhill"), Row("3", "q", "A")]
  rep = rw.score_realworldqa(rows, ["(B) the left lane", "3.", "downhill", "Downhill"])
  assert [r["correct"] for r in rep["rows"]] == [True, True, True, False]
  assert rep["metrics"]["accuracy"] == 0.75


def _hb(index, cat, l2, ans):
  return Row(index, "Is it?", ans, cat, extra={"l2-category": l2})


def test_hallusionbench_aacc_facc_qacc():
  # VLMEvalKit index: fields 3, 4, 5 are set, figure and question
  rows = [_hb(f"VD_chart_0_0_{fig}_{q}", "VD", "chart", ans)
          for fig, q, ans in ((0, 0, "Yes"), (0, 1, "No"), (1, 0, "No"), (1, 1, "Yes"))]
  rows.append(_hb("VS_map_0_1_0_0", "VS", "map", "Yes"))
  preds = ["Yes.", "No", "Yes, it is", "yes", "Yes"]  # only row 3 (figure 1, question 0) wrong
  rep = rw.score_hallusionbench(rows, preds)
  # figures: chart/0/0 all right, chart/0/1 not, map/1/0 right -> 2/3;
  # questions: chart/0/q0 wrong on figure 1, chart/0/q1 right on both, map/1/q0 right -> 2/3
  assert rep["metrics"] == pytest.approx({"aAcc": 4 / 5, "fAcc": 2 / 3, "qAcc": 2 / 3,
                                          "count": 5})
  assert rep["categories"]["VD"] == pytest.approx({"aAcc": 0.75, "fAcc": 0.5, "qAcc": 0.5,
                                                   "count": 4})
  assert rep["categories"]["chart"] == rep["categories"]["VD"]    # l2-category split too
  assert rep["categories"]["VS"]["qAcc"] == 1.0
  # an answer saying both yes and no is 'unknown', hence wrong; lmms-eval's ids as columns
  # and gt_answer '1' / '0'
  cols = Row("7", "Is it?", "1", "VS", extra={"subcategory": "map", "set_id": "2",
                                              "figure_id": "0", "question_id": "1"})
  assert rw.hallusion_ids(cols) == ("2", "0", "1")
  rep = rw.score_hallusionbench([cols, cols], ["yes", "yes or no"])
  assert rep["metrics"]["aAcc"] == 0.5 and rep["metrics"]["fAcc"] == 0.0


def test_mme_realworld_letter_and_accuracy():
  let = rw.mme_realworld_letter
  assert let("The best answer is: (C)") == "C"
  assert let("c") == "C"                  # no capital: the "(x)" holding the answer
  assert let("Answer: B") == "A"           # the first capital A-E, as the official regex
  assert let("") == "A"                    # an empty answer reads as A there
  assert let("this sentence has more than ten words but not one capital letter in it") == ""
  def row(i, cat, l2, ans):
    return Row(str(i), "q", ans, cat, extra={"l2-category": l2})
  rows = [row(0, "Perception/Monitoring", "vehicle/counting", "A"),
          row(1, "Perception/Monitoring", "person/color attribute", "B"),
          row(2, "Perception/Remote Sensing", "position", "C"),
          row(3, "Reasoning/Autonomous_Driving", "intention", "E")]
  rep = rw.score_mme_realworld(rows, ["A", "(D)", "The answer is C", "E"])
  m = rep["metrics"]
  assert (m["accuracy"], m["e_ratio"], m["count"]) == (0.75, 0.25, 4)
  c = rep["categories"]
  assert c["Perception"]["accuracy"] == pytest.approx(2 / 3)
  assert c["Perception/Monitoring"]["accuracy"] == 0.5
  assert c["Perception/Monitoring/person/attribute"]["accuracy"] == 0.0  # attribute folded
  assert c["Reasoning/Autonomous_Driving"] == {"accuracy": 1.0, "e_ratio": 1.0, "count": 1}


def test_mmmu_multi_choice_parser():
  opts = {"A": "red circle", "B": "blue square", "C": "green", "D": "yellow"}
  p = lambda text: mmmu.parse_multi_choice_response(text, list(opts), opts)  # noqa: E731
  assert p("The answer is (B).") == ("B", False)
  assert p("A") == ("A", False)
  assert p("B. It is a cat") == ("B", False)                      # "B." (no "B " present)
  assert p("I think it's (A) or maybe (C)") == ("C", False)       # the last bracketed one
  assert p("Between A and C I pick C ") == ("C", False)           # the last " x "
  assert p("I believe the right one is the blue square") == ("B", False)  # > 5 words: text
  assert p("blue square")[1]                                       # <= 5 words: a guess
  guess = mmmu.parse_multi_choice_response("dunno", list(opts), opts, mmmu.random.Random(1))
  assert guess[1] and guess[0] in opts


def test_mmmu_open_parser_and_eval_open():
  assert mmmu.parse_open_response("The answer is 3.14159") == [3.14]
  assert mmmu.eval_open("3.14", [3.14]) and not mmmu.eval_open("3.15", [3.14])
  preds = mmmu.parse_open_response("1,000 people")
  assert set(preds) == {"1,000 people", 1000.0, 0.0}  # "000" is a number too (MMMU's regex)
  assert mmmu.eval_open("1000", preds)
  assert mmmu.eval_open("5", mmmu.parse_open_response("so we get x = 5"))
  # a one-character reference must stand alone: not inside "banana"
  assert not mmmu.eval_open("a", mmmu.parse_open_response("banana"))
  assert mmmu.eval_open("a", mmmu.parse_open_response("the answer is a"))
  assert mmmu.eval_open(["24/7", "3.429"], mmmu.parse_open_response("It is 3.429"))
  assert mmmu.eval_open("Paris", mmmu.parse_open_response("Therefore the capital is paris."))


def test_mmmu_score_per_subject_and_domain():
  two = {"A": "yes", "B": "no"}
  rows = [Row("1", "q <image 1>", "A", "Art_Theory", options=two,
              extra={"id": "validation_Art_Theory_1"}, image_count=2),
          Row("2", "q", "7", "Art", extra={"id": "validation_Art_2"}, image_count=1),
          Row("3", "q", "B", "Math", options=two, image_count=1),
          Row("4", "q", "x", "Cooking", extra={"question_type": "open"})]
  rep = mmmu.score_mmmu(rows, ["(A)", "The result is 7.", "A", "y"])
  assert rep["metrics"] == {"accuracy": 0.5, "count": 4, "multi_image": 1, "random_guesses": 0}
  c = rep["categories"]
  assert c["Overall-Art and Design"] == {"accuracy": 1.0, "count": 2}
  assert c["Art_Theory"]["accuracy"] == 1.0 and c["Art"]["accuracy"] == 1.0
  assert c["Overall-Science"] == {"accuracy": 0.0, "count": 1} and c["Math"]["accuracy"] == 0.0
  assert c["Cooking"]["count"] == 1                           # a subject outside the domains
  assert list(c)[:3] == ["Overall-Art and Design", "Art", "Art_Theory"]
  assert [r["open"] for r in rep["rows"]] == [False, True, False, True]
  assert mmmu.subject_of(Row("5", "q", "A", "Art Theory")) == "Art_Theory"


FRACTIONS = {"A": "3/11", "B": "8/11", "C": "6/11", "D": "3/5"}


def test_mathvista_can_infer_letter_and_option_text():
  ci = lambda text: bm.can_infer(text, dict(FRACTIONS))  # noqa: E731
  assert ci("B") == "B"
  assert ci("(B) 8/11") == "B"                       # brackets are word breaks
  assert ci("8/11") == "B"                           # no letter: the one option text inside
  assert ci("The answer is c") == "C"                # VLMEvalKit's regex ignores case
  assert ci("A or B") is False                       # two letters, no option text
  # one letter, but not among the last four words; too long for the option texts (> 2 * 15)
  assert ci("B is right because eight of the eleven parts are shaded") is False
  assert ci("Sorry, I can't help with images of people yet.") == "Z"  # a refusal
  assert ci("Z") == "Z"


def _mv(index, answer, kind, task, skills, **extra):
  qtype = "multi_choice" if kind == "text" else "free_form"
  return Row(index, "Hint: ...\nQuestion: ...", answer,
             extra={"question_type": qtype, "answer_type": kind, "task": task, "skills": skills,
                    **extra})


def test_mathvista_rules_per_answer_type():
  mc = _mv("1", "8/11", "text", "t", "[]", choices=str(list(FRACTIONS.values())),
           answer_option="B")
  assert mv.check(mc, "(B) 8/11") == ("B", True, True)
  assert mv.check(mc, "8/11") == ("B", True, True)              # by the option's text
  assert mv.check(mc, "A") == ("A", True, False)                # resolved, wrong
  assert mv.check(mc, "none of them") == (None, False, False)
  integer = _mv("2", "14", "integer", "t", "[]")
  assert mv.check(integer, " 14\n") == (14, True, True)         # int() allows whitespace
  assert mv.check(integer, "14.") == (None, False, False)        # the whole answer must parse
  assert mv.check(integer, "The answer is 14") == (None, False, False)  # the judge's job
  assert mv.check(integer, "15") == (15, False, False)
  # precision 2 shapes the hint only: post_check compares the floats as they are
  flt = _mv("3", "1.45", "float", "t", "[]", precision="2")
  assert mv.check(flt, "1.450") == (1.45, True, True)
  assert mv.check(flt, "1.4501")[2] is False and mv.check(flt, "1.5")[2] is False
  assert mv.check(_mv("4", "0", "integer", "t", "[]"), "0")[2] is True  # 0 is falsy there
  # post_check compares str(None) with a list reference: never right, judged or not
  lst = _mv("5", ["2007", "2008"], "list", "t", "[]")
  assert mv.check(lst, "[2007, 2008]") == (None, False, False)


def test_mathvista_accuracy_per_task_and_skill():
  choices = str(list(FRACTIONS.values()))
  rows = [_mv("1", "8/11", "text", "figure question answering",
              "['arithmetic reasoning', 'algebraic reasoning']", choices=choices,
              answer_option="B"),
          _mv("2", "14", "integer", "figure question answering", "['arithmetic reasoning']"),
          _mv("3", "1.5", "float", "geometry problem solving",
              "['geometry reasoning', 'algebraic reasoning']", precision="1"),
          _mv("4", ["2007", "2008"], "list", "math word problem", "['arithmetic reasoning']"),
          _mv("5", "3/5", "text", "textbook question answering", "scientific reasoning",
              choices=choices, answer_option="D")]
  preds = ["B", "The answer is 14.", "1.5", "[2007, 2008]", "A"]
  rep = mv.score_mathvista(rows, preds)
  # right: rows 1 and 3; resolved by the rules: rows 1, 3 and 5 (a letter, if wrong)
  assert rep["metrics"] == {"accuracy": 0.4, "prefetch_rate": 0.6, "count": 5}
  c = rep["categories"]
  assert list(c) == ["figure question answering", "geometry problem solving",
                     "math word problem", "textbook question answering",
                     "algebraic reasoning", "arithmetic reasoning", "geometry reasoning",
                     "scientific reasoning"]
  assert c["figure question answering"] == {"accuracy": 0.5, "prefetch_rate": 0.5, "count": 2}
  # row 1 counts for both its skills: arithmetic rows 1, 2, 4; algebraic rows 1, 3
  assert c["arithmetic reasoning"] == pytest.approx({"accuracy": 1 / 3, "prefetch_rate": 1 / 3,
                                                     "count": 3})
  assert c["algebraic reasoning"] == {"accuracy": 1.0, "prefetch_rate": 1.0, "count": 2}
  assert c["textbook question answering"] == {"accuracy": 0.0, "prefetch_rate": 1.0, "count": 1}
  assert c["scientific reasoning"]["count"] == 1     # a bare skill, not a list: one skill
  assert [r["extracted"] for r in rep["rows"]] == ["B", None, 1.5, None, "A"]
  assert [r["answer"] for r in rep["rows"]][:2] == ["B", "14"]  # the letter of a choice row


def test_mathvista_hugging_face_layout():
  # AI4Math/MathVista: task and skills inside `metadata`, the answer is the choice's text, no
  # answer_option; question_type / answer_type missing: read from the choices and the answer
  meta = str({"task": "math word problem", "skills": ["arithmetic reasoning"], "split": "testmini"})
  mc = Row("7", "What fraction is blue?", "8/11",
           extra={"choices": str(list(FRACTIONS.values())), "metadata": meta})
  free = Row("8", "How many?", "3", extra={"metadata": meta})
  assert (mv.question_type(mc), mv.answer_type(mc), mv.answer_option(mc)) == (
      "multi_choice", "text", "B")
  assert (mv.question_type(free), mv.answer_type(free)) == ("free_form", "integer")
  rep = mv.score_mathvista([mc, free], ["The answer is B", "3"])
  assert rep["metrics"]["accuracy"] == 1.0
  assert set(rep["categories"]) == {"math word problem", "arithmetic reasoning"}
