"""Files, prompts and reports of OCRBench, ChartQA, DocVQA / InfoVQA, VizWiz, RealWorldQA,
HallusionBench, MME-RealWorld, MMMU and MathVista (tiny VLMEvalKit-layout TSVs, no model)."""
import base64

import pytest

from fusion_jax.eval import bench, bench_formats, bench_prompts
from fusion_jax.eval.bench_formats import Row
from tests.bench_fixtures import png_b64, write_tsv

SHORT = "\nAnswer the question using a single word or phrase."


def test_ocr_and_document_tsvs(tmp_path):
  img = png_b64()
  ocr = write_tsv(tmp_path / "OCRBench.tsv", [
      {"index": 0, "image": img, "question": " what is written in the image? ",
       "answer": "['STOP', 'stop sign']", "category": "Regular Text Recognition"}],
      ["index", "image", "question", "answer", "category"])
  (row,), bad = bench_formats.read_tsv(str(ocr))
  assert bad == [] and row.answer == ["STOP", "stop sign"] and row.image_count == 1
  assert bench_prompts.ocrbench(row) == "what is written in the image?"  # lmms-eval: stripped
  chart = write_tsv(tmp_path / "ChartQA_TEST.tsv", [
      {"index": 1, "image": img, "question": "What is the peak value?", "answer": "42",
       "split": "human"}], ["index", "image", "question", "answer", "split"])
  (row,), _ = bench_formats.read_tsv(str(chart))
  assert row.answer == "42" and row.extra == {"split": "human"}
  assert bench_prompts.chartqa(row) == ("What is the peak value?\n"
                                        "Answer the question with a single word.")
  doc = write_tsv(tmp_path / "DocVQA_VAL.tsv", [
      {"index": 2, "image": img, "question": "What is the date?",
       "answer": "['May 12', '12 May']"}], ["index", "image", "question", "answer"])
  (row,), _ = bench_formats.read_tsv(str(doc))
  assert row.answer == ["May 12", "12 May"]
  assert bench_prompts.docvqa(row) == "What is the date?" + SHORT
  # VizWiz's VLMEvalKit file calls the references `answers`
  viz = write_tsv(tmp_path / "VizWiz.tsv", [
      {"index": 3, "image": img, "question": "what color is THIS shirt?",
       "answers": str(["blue"] * 7 + ["unanswerable"] * 3), "category": "other"}],
      ["index", "image", "question", "answers", "category"])
  (row,), _ = bench_formats.read_tsv(str(viz))
  assert row.answer == ["blue"] * 7 + ["unanswerable"] * 3 and "answers" not in row.extra
  assert bench_prompts.vizwiz(row) == (  # lmms-eval vizwiz_vqa_doc_to_text: capitalize()
      "What color is this shirt?\nWhen the provided information is insufficient, respond "
      "with 'Unanswerable'." + SHORT)
  assert bench_prompts.vizwiz(Row("3", bench_prompts.vizwiz(row), "x")) == bench_prompts.vizwiz(row)


def test_multiple_choice_and_yes_no_tsvs(tmp_path):
  img = png_b64()
  rwq = ("Which way does the road turn?\n\nA. Left\nB. Right\nC. Straight\n\n"
         "Please answer directly with only the letter of the correct option and nothing else.")
  path = write_tsv(tmp_path / "RealWorldQA.tsv", [
      {"index": 0, "image": img, "question": rwq + "\n", "A": "Left", "B": "Right",
       "C": "Straight", "answer": "B"},
      {"index": 1, "image": "0", "question": "Which way does the road turn?", "A": "Left",
       "B": "Right", "C": "Straight", "answer": "B"}],
      ["index", "image", "question", "A", "B", "C", "answer"])
  (r0, r1), _ = bench_formats.read_tsv(str(path))
  assert bench_prompts.realworldqa(r0) == rwq       # the dataset's own text, stripped
  assert bench_prompts.realworldqa(r1) == rwq       # options rebuilt in that layout
  # MME-RealWorld: VLMEvalKit's cell holds the header and the options; its Lite file a list
  opts = ["(A) red", "(B) blue", "(C) green", "(D) white", "(E) The image does not feature it."]
  cols = ["index", "image", "question", "multi-choice options", "A", "B", "C", "D", "E",
          "answer", "category", "l2-category"]
  path = write_tsv(tmp_path / "MME-RealWorld.tsv", [
      {"index": 5, "image": img, "question": "What color is the car?",
       "multi-choice options": "The choices are listed below:\n" + "\n".join(opts),
       **{k: o[4:] for k, o in zip("ABCDE", opts)}, "answer": "B",
       "category": "Perception/Monitoring", "l2-category": "vehicle/color attribute"},
      {"index": 6, "image": img, "question": "What color is the car?",
       "multi-choice options": str(opts), "answer": "B", "category": "Perception/Monitoring"},
      {"index": 7, "image": img, "question": "What color is the car?",
       **{k: o[4:] for k, o in zip("ABCDE", opts)}, "answer": "B",
       "category": "Perception/Monitoring"}], cols)
  rows, _ = bench_formats.read_tsv(str(path))
  expected = ("What color is the car? The choices are listed below:\n" + "\n".join(opts) +
              "\nSelect the best answer to the above multiple-choice question based on the "
              "image. Respond with only the letter (A, B, C, D, or E) of the correct option.\n"
              "The best answer is: ")
  assert [bench_prompts.mme_realworld(r) for r in rows] == [expected] * 3
  # HallusionBench: string indices, figures shared by reference, no instruction added
  path = write_tsv(tmp_path / "HallusionBench.tsv", [
      {"index": "VD_chart_0_3_1_0", "image": img, "question": "Is the bar red?",
       "answer": "Yes", "category": "VD", "l2-category": "chart"},
      {"index": "VD_chart_0_3_1_1", "image": "VD_chart_0_3_1_0", "question": "Is it blue?",
       "answer": "No", "category": "VD", "l2-category": "chart"}],
      ["index", "image", "question", "answer", "category", "l2-category"])
  (h0, h1), bad = bench_formats.read_tsv(str(path))
  assert bad == [] and h1.image == h0.image and h1.extra == {"l2-category": "chart"}
  assert bench_prompts.hallusionbench(h1) == "Is it blue?"
  from fusion_jax.eval.bench_realworld import hallusion_ids
  assert hallusion_ids(h1) == ("3", "1", "1")


def test_mmmu_tsv_first_image_and_prompts(tmp_path):
  red, blue = png_b64((250, 0, 0)), png_b64((0, 0, 250), size=(8, 8))
  cols = ["index", "image", "question", "A", "B", "C", "answer", "category", "split", "id"]
  path = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", [
      {"index": 1, "image": str([red, blue]), "question": "<image 1> or <image 2>: which?",
       "A": "<image 1>", "B": "<image 2>", "answer": "B", "category": "Art",
       "split": "validation", "id": "validation_Art_1"},
      {"index": 2, "image": red, "question": "How many sides? <image 1>", "answer": "4",
       "category": "Math", "split": "dev"},
      {"index": 3, "image": "[" + "x" * 80, "question": "Broken list?", "answer": "A"}], cols)
  rows, bad = bench_formats.read_tsv(str(path))
  assert [i for i, _ in bad] == ["3"] and "list of base64" in bad[0][1]
  mc, opn = rows
  assert (mc.image_count, opn.image_count) == (2, 1)
  assert mc.image == base64.b64decode(red)          # the first image is the one asked
  # lmms-eval construct_prompt (default kwargs): placeholders stay in the text
  assert bench_prompts.mmmu(mc) == (
      "<image 1> or <image 2>: which?\nA. <image 1>\nB. <image 2>\n\n"
      "Answer with the option's letter from the given choices directly.")
  assert bench_prompts.mmmu(opn) == (
      "How many sides? <image 1>\n\nAnswer the question using a single word or phrase.")
  # lmms-eval's layout: options as a list cell, question_type
  hf = Row("v", "Q?", "A", extra={"options": "['x', 'y']", "question_type": "multiple-choice"})
  assert bench_prompts.mmmu(hf).startswith("Q?\nA. x\nB. y\n\n")
  # MMMU asks a multi-image row with its first image; other benchmarks skip it
  asked = []

  def predict(prompts):
    asked.extend(prompts)
    return ["B", "4"][:len(prompts)] if len(prompts) == 2 else ["4"]

  rep = bench.evaluate_rows(bench.get_benchmark("MMMU"), rows, predict)
  assert rep["metrics"]["accuracy"] == 1.0 and rep["metrics"]["multi_image"] == 1
  assert asked[0][1] == mc.image and rep["skipped"] == []
  rep = bench.evaluate_rows(bench.get_benchmark("OCRBench"), rows, predict)
  assert rep["metrics"]["count"] == 1
  assert rep["skipped"] == [("1", "2 images in one row (multi-image questions are unsupported "
                                  "for OCRBench)")]


MV_COLS = ["index", "image", "question", "answer", "answer_option", "choices", "unit",
           "precision", "question_type", "answer_type", "task", "skills"]


def test_mathvista_tsv_and_prompt(tmp_path):
  img = png_b64()
  mc_q = ("Hint: Please answer the question and provide the correct option letter, e.g., A, B, "
          "C, D, at the end.\nQuestion: What fraction of the shape is blue?\nChoices:\n"
          "(A) 3/11\n(B) 8/11\n(C) 6/11\n(D) 3/5")
  float_q = ("Hint: Please answer the question requiring a floating-point number with two "
             "decimal places and provide the final value, e.g., 1.23, 1.34, 1.45, at the end.\n"
             "Question: How much money does Luca need? (Unit: $)")
  path = write_tsv(tmp_path / "MathVista_MINI.tsv", [
      {"index": 1, "image": img, "question": mc_q, "answer": "8/11", "answer_option": "B",
       "choices": "['3/11', '8/11', '6/11', '3/5']", "question_type": "multi_choice",
       "answer_type": "text", "task": "figure question answering",
       "skills": "['arithmetic reasoning', 'algebraic reasoning']"},
      {"index": 2, "image": "1", "question": float_q, "answer": "1.45", "choices": "None",
       "unit": "$", "precision": "2.0", "question_type": "free_form", "answer_type": "float",
       "task": "math word problem", "skills": "['arithmetic reasoning']"},
      {"index": 3, "image": img, "question": "Hint: ...\nQuestion: Between which two years?",
       "answer": "[2007, 2008]", "question_type": "free_form", "answer_type": "list",
       "task": "figure question answering", "skills": "['statistical reasoning']"}], MV_COLS)
  (mc, flt, lst), bad = bench_formats.read_tsv(str(path))
  assert bad == [] and flt.image == mc.image
  assert mc.options == {} and mc.extra["answer_option"] == "B"
  assert "choices" not in flt.extra and flt.extra["precision"] == "2.0"
  assert lst.answer == ["2007", "2008"]
  # VLMEvalKit's ImageBaseDataset.build_prompt: the question cell as it is
  assert [bench_prompts.mathvista(r) for r in (mc, flt)] == [mc_q, float_q]
  from fusion_jax.eval import bench_mathvista as mv
  assert mv.choices_of(mc) == {"A": "3/11", "B": "8/11", "C": "6/11", "D": "3/5"}
  assert mv.skills_of(mc) == ["arithmetic reasoning", "algebraic reasoning"]
  rep = bench.evaluate_rows(bench.get_benchmark("MathVista_MINI"), [mc, flt, lst],
                            lambda prompts: ["B", "1.45", "[2007, 2008]"])
  assert rep["metrics"]["accuracy"] == pytest.approx(2 / 3)
  assert rep["categories"]["figure question answering"]["accuracy"] == 0.5
  # the Hugging Face layout: a bare question and its `query`
  hf = Row("4", "What fraction of the shape is blue?", "8/11", extra={"query": mc_q})
  assert bench_prompts.mathvista(hf) == mc_q


def _spec(name):
  """(rows, answers given, expected primary metric, categories that must be reported)."""
  two = {"A": "left", "B": "right"}
  if name == "OCRBench":
    cats = ["Regular Text Recognition", "Doc-oriented VQA"]
    rows = [Row(str(i), "q", [["left"], ["right"]][i % 2], cats[i // 2]) for i in range(4)]
    return rows, ["left", "right"] * 2, 4, {"Text Recognition", "Doc-oriented VQA"}
  if name == "ChartQA":  # 10.2 vs 10: 2 % off; 21.5 vs 20: 7.5 % off
    rows = [Row(str(i), "q", ["10", "20"][i % 2],
                extra={"type": ["human_test", "augmented_test"][i // 2]}) for i in range(4)]
    return rows, ["10.2", "21.5"] * 2, 0.5, {"human", "augmented"}
  if name in ("DocVQA_VAL", "InfoVQA_VAL"):  # "rihgt": 2 edits of 5
    rows = [Row(str(i), "q", [["left"], ["right"]][i % 2], ["c1", "c2"][i // 2])
            for i in range(4)]
    return rows, ["left", "rihgt"] * 2, pytest.approx(0.8), {"c1", "c2"}
  if name == "VizWiz":
    rows = [Row(str(i), "q", [["left"] * 10, ["unanswerable"] * 10][i % 2], ["c1", "c2"][i // 2])
            for i in range(4)]
    return rows, ["left", "Unanswerable"] * 2, 1.0, {"c1", "c2"}
  if name == "RealWorldQA":
    rows = [Row(str(i), "q", "AB"[i % 2], options=two) for i in range(4)]
    return rows, ["A", "The answer is B."] * 2, 1.0, {"all"}
  if name == "HallusionBench":
    rows = [Row(f"V{'DS'[i // 2]}_chart_0_0_{i % 2}_0", "q", ["Yes", "No"][i % 2],
                ["VD", "VS"][i // 2], extra={"l2-category": "chart"}) for i in range(4)]
    return rows, ["Yes", "Yes"] * 2, 0.5, {"VD", "VS", "chart"}
  if name == "MME-RealWorld":
    cats = ["Perception/Monitoring", "Reasoning/Remote Sensing"]
    rows = [Row(str(i), "q", "AB"[i % 2], cats[i // 2], options=two,
                extra={"l2-category": "count"}) for i in range(4)]
    return rows, ["A", "B"] * 2, 1.0, {"Perception", "Reasoning/Remote Sensing"}
  if name == "MathVista":  # a choice row right by its option text, an integer row wrong
    tasks = ["figure question answering", "math word problem"]
    rows = [Row(str(i), "q", ["8/11", "14"][i % 2],
                extra={"question_type": ["multi_choice", "free_form"][i % 2],
                       "answer_type": ["text", "integer"][i % 2], "task": tasks[i // 2],
                       "choices": "['3/11', '8/11']", "skills": "['arithmetic reasoning']"})
            for i in range(4)]
    return rows, ["8/11", "14 apples"] * 2, 0.5, {*tasks, "arithmetic reasoning"}
  assert name == "MMMU"
  rows = [Row(str(i), "q", "AB"[i % 2], ["Art", "Math"][i // 2], options=two) for i in range(4)]
  return rows, ["(A)", "B"] * 2, 1.0, {"Art", "Math", "Overall-Art and Design"}


@pytest.mark.parametrize("name", ["OCRBench", "ChartQA", "DocVQA_VAL", "InfoVQA_VAL", "VizWiz",
                                  "RealWorldQA", "HallusionBench", "MME-RealWorld", "MMMU",
                                  "MathVista"])
def test_newer_benchmarks_score_print_and_plot(name, tmp_path):
  b = bench.get_benchmark(name)
  rows, said, expected, cats = _spec(name)
  rep = bench.evaluate_rows(b, rows, lambda prompts: said[:len(prompts)])
  assert rep["metrics"][b.primary] == expected and rep["metrics"]["count"] == 4
  assert rep["skipped"] == [] and cats <= set(rep["categories"])
  assert all(b.primary in m for m in rep["categories"].values())  # the chart's bars
  report = {**rep, "model": "tiny"}
  table = bench.format_table(report)
  assert table.splitlines()[-1].startswith("overall")
  bench.plot(report, b, str(tmp_path / "chart.png"))
  assert (tmp_path / "chart.png").stat().st_size > 0
  with pytest.raises(ValueError, match="--circular applies"):
    bench.evaluate_rows(b, rows, lambda prompts: said, circular=True)
