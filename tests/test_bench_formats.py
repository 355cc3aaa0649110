"""Benchmark files (VLMEvalKit TSV, LLaVA question jsonl + answers), prompts, row selection."""
import base64
import io
import json
import os

import pytest
from PIL import Image

from fusion_jax.eval import bench, bench_formats, bench_prompts
from fusion_jax.eval.bench_formats import Row
from fusion_jax.eval.bench_model import Refused
from tests.bench_fixtures import MMB_COLS, png_b64, write_tsv


def test_tsv_image_refs_bad_rows_and_options(tmp_path):
  img = png_b64()
  rows = [
      {"index": 0, "question": "What is it?", "hint": "nan", "A": "cat", "B": "dog", "C": "nan",
       "answer": "A", "category": "obj", "image": img, "split": "dev"},
      {"index": 1, "question": "Color?", "hint": "Look closely.", "A": "red", "B": "blue",
       "C": "green", "D": "pink", "answer": "C", "category": "attr", "image": "0"},
      {"index": 2, "question": "Broken?", "A": "x", "B": "y", "answer": "A", "image": "!" * 80},
      {"index": 3, "question": "No image?", "A": "x", "B": "y", "answer": "A", "image": ""},
      {"index": 4, "question": "Bad ref?", "A": "x", "B": "y", "answer": "A", "image": "77"},
      {"index": 5, "question": "Not an image?", "A": "x", "B": "y", "answer": "B",
       "image": base64.b64encode(b"hello, not a picture" * 5).decode()},
  ]
  path = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", rows, MMB_COLS)
  good, bad = bench_formats.read_tsv(str(path))
  assert [r.index for r in good] == ["0", "1"]
  assert [i for i, _ in bad] == ["2", "3", "4", "5"]
  assert "base64" in dict(bad)["2"] and dict(bad)["3"] == "missing image"
  assert "not a readable image" in dict(bad)["5"]
  assert "77" in dict(bad)["4"]
  r0, r1 = good
  assert r0.options == {"A": "cat", "B": "dog"} and r0.hint == ""   # 'nan' cells are missing
  assert r1.image == r0.image and r1.image_key == "0"               # image by reference
  assert r1.hint == "Look closely." and r1.extra == {}
  assert r0.extra == {"split": "dev"}
  assert Image.open(io.BytesIO(r0.image)).size == (24, 16)
  # lmms-eval mmbench_doc_to_text + create_options_prompt + post_prompt
  assert bench_prompts.mmbench(r1) == (
      "Look closely. Color? There are several options:\nA. red\nB. blue\nC. green\nD. pink\n"
      "Answer with the option's letter from the given choices directly.")
  assert bench_prompts.mmbench(r0).startswith("What is it? There are several options:\nA. cat")


def test_tsv_textvqa_answer_list_and_missing_columns(tmp_path):
  cols = ["index", "question", "answer", "image"]
  answers = str(["stop"] * 3 + ["stop sign"] * 7)
  path = write_tsv(tmp_path / "TextVQA_VAL.tsv",
                   [{"index": 7, "question": "what does the SIGN say?", "answer": answers,
                     "image": png_b64()}], cols)
  (row,), bad = bench_formats.read_tsv(str(path))
  assert bad == [] and row.answer == ["stop"] * 3 + ["stop sign"] * 7
  assert bench_prompts.textvqa(row) == ("What does the sign say?\n"
                                        "Answer the question using a single word or phrase.")
  bad_path = write_tsv(tmp_path / "bad.tsv", [{"question": "q"}], ["question", "answer"])
  with pytest.raises(ValueError, match="no 'index' column"):
    bench_formats.read_tsv(str(bad_path))


def test_prompts_follow_lmms_eval():
  q = Row("1", "Which way?", "A", options={"A": "left", "B": "right"}, hint="A map.")
  assert bench_prompts.scienceqa(q) == (
      "Context: A map.\nWhich way?\nA. left\nB. right\n"
      "Answer with the option's letter from the given choices directly.")
  assert bench_prompts.mmvp(Row("1", "Open?", "(a)", extra={"options": "(a) Open (b) Closed"})) == (
      "Open?\nA. Open\nB. Closed\nAnswer with the option's letter from the given choices directly.")
  ai2d = Row("1", "Which stage comes first?", "0", extra={"options": "['egg', 'larva']"})
  assert bench_prompts.ai2d(ai2d) == (  # lmms-eval ai2d_doc_to_text, prompt_format mcq
      "Which stage comes first?\nA. egg\nB. larva\n"
      "Answer with the option's letter from the given choices directly.")
  star = Row("1", "Which animal is it?\nOptions: A: cat, B: dog", "A",
             options={"A": "cat", "B": "dog"})
  assert bench_prompts.mmstar(star) == (  # lmms-eval mmstar_doc_to_text: no full stop
      "Which animal is it?\nOptions: A: cat, B: dog\n"
      "Answer with the option's letter from the given choices directly")
  bare = Row("1", " Which animal is it? ", "A", options={"A": "cat", "B": "dog"})
  assert bench_prompts.mmstar(bare) == bench_prompts.mmstar(star)  # options appended likewise
  seed = Row("1", "How many cats?", "B", extra={f"choice_{c}": str(i) for i, c in
                                                 enumerate("abcd")})
  assert bench_prompts.seedbench(seed) == (  # lmms-eval seed_doc_to_text
      "How many cats?\nA. 0\nB. 1\nC. 2\nD. 3\n"
      "Answer with the option's letter from the given choices directly.")
  assert bench_prompts.cv_bench(q) == (
      "Note: You only need to respond with A, B without providing any additional information.\n"
      "\nWhich way? Select from the following choices.\n(A) left\n(B) right")
  mme = Row("1", "Is there a dog in the image? Please answer yes or no.", "Yes")
  assert bench_prompts.mme(mme) == ("Is there a dog in the image?\n"
                                    "Answer the question using a single word or phrase.")
  pope = Row("1", "Is there a cat in the image?", "no")
  assert bench_prompts.short_answer(pope).endswith("image?\nAnswer the question using a single "
                                                   "word or phrase.")
  # LLaVA jsonl text that already carries the instruction does not get it twice
  done = Row("1", "What is it?\nAnswer the question using a single word or phrase.", "x")
  assert bench_prompts.short_answer(done) == done.question


def test_jsonl_questions_with_answer_files(tmp_path):
  os.makedirs(tmp_path / "img")
  Image.new("RGB", (20, 20), (0, 90, 0)).save(tmp_path / "img" / "a.jpg")
  (tmp_path / "img" / "broken.jpg").write_bytes(b"not a jpeg")
  qs = [{"question_id": 1, "image": "a.jpg", "text": "Is there a tree?", "category": "random"},
        {"question_id": 2, "image": "missing.jpg", "text": "Is there a car?"},
        {"question_id": 3, "image": "broken.jpg", "text": "Is there a bus?"},
        {"question_id": 4, "image": "a.jpg", "text": "Is there a dog?"},
        {"question_id": 5, "image": "a.jpg", "text": "Unanswered?"}]
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("\n".join(json.dumps(q) for q in qs))
  afile = tmp_path / "a.jsonl"  # POPE's coco_pope_*.json layout: question_id + label
  afile.write_text("\n".join(json.dumps({"question_id": i, "label": lab})
                             for i, lab in [(1, "yes"), (2, "no"), (3, "no"), (4, "no")]))
  rows, bad = bench_formats.read_jsonl(str(qfile), bench_formats.answers_for_jsonl(str(afile)),
                                       image_root=str(tmp_path / "img"))
  assert [(r.index, r.answer, r.category) for r in rows] == [("1", "yes", "random"),
                                                              ("4", "no", "")]
  assert os.path.isfile(rows[0].image)
  assert [i for i, _ in bad] == ["2", "3", "5"]
  assert "missing image" in dict(bad)["2"] and "answers file" in dict(bad)["5"]
  # TextVQA's {"data": [...answers...]} and GQA's {qid: {"answer": ..}} answer files
  tv = tmp_path / "textvqa.json"
  tv.write_text(json.dumps({"data": [{"question_id": 1, "answers": ["a"] * 10}]}))
  assert bench_formats.answers_for_jsonl(str(tv)) == {"1": ["a"] * 10}
  gqa = tmp_path / "gqa.json"
  gqa.write_text(json.dumps({"201": {"answer": "left", "imageId": "n1"}}))
  assert bench_formats.answers_for_jsonl(str(gqa)) == {"201": "left"}


def test_limit_keeps_circular_copies_and_benchmark_names():
  rows = [Row(i, "q", "A") for i in ("1", "2", "3", "1000001", "1000002", "2000003")]
  assert [r.index for r in bench_formats.limit_rows(rows, 2)] == ["1", "2", "1000001", "1000002"]
  assert bench.get_benchmark("MMBench_DEV_EN").name == "MMBench"
  assert bench.get_benchmark("cv-bench-2d").name == "CV-Bench"
  assert bench.get_benchmark("scienceqa_img").name == "ScienceQA_IMG"
  # the longest prefix wins: MME-RealWorld is not MME
  assert [bench.get_benchmark(n).name for n in
          ("MME", "mme_realworld", "MME-RealWorld-Lite", "OCRBench", "ChartQA_TEST",
           "docvqa_val", "InfoVQA_VAL", "vizwiz_vqa_val", "VizWiz", "realworldqa",
           "hallusion_bench_image", "MMMU_DEV_VAL", "mmmu_val")] == [
      "MME", "MME-RealWorld", "MME-RealWorld", "OCRBench", "ChartQA", "DocVQA_VAL",
      "InfoVQA_VAL", "VizWiz", "VizWiz", "RealWorldQA", "HallusionBench", "MMMU", "MMMU"]
  with pytest.raises(ValueError, match="unknown; choose one of MMBench"):
    bench.get_benchmark("nope")


def test_evaluate_rows_skips_unaskable_rows_and_circular_groups():
  opts = {"A": "x", "B": "y"}
  rows = [Row("1", "q1", "A", "c", options=opts), Row("2", "q2", "B", "c", options=opts),
          Row("1000001", "q1", "B", "c", options={"A": "y", "B": "x"})]
  mmb = bench.get_benchmark("MMBench")
  asked = []

  def predict(prompts):
    asked.extend(p for p, _ in prompts)
    return ["A" if "q1" in p else Refused("too long") for p, _ in prompts]  # q2 does not fit

  rep = bench.evaluate_rows(mmb, rows, predict)
  assert len(asked) == 2                                     # circular copy not asked
  assert rep["metrics"] == {"accuracy": 1.0, "count": 1}
  assert rep["skipped"] == [("2", "too long")]
  asked.clear()
  rep = bench.evaluate_rows(mmb, rows, predict, circular=True)
  # q1: the file's copy (index 1000001) answered 'A' but its answer is 'B' -> q1 wrong;
  # q2's rotation is made here (no copy in the file), and q2 cannot be asked at all
  assert len(asked) == 4
  assert rep["metrics"] == {"accuracy": 0.0, "count": 2, "questions": 1}
  assert {i for i, _ in rep["skipped"]} == {"2", "1000002"}
  with pytest.raises(ValueError, match="multiple-choice"):
    bench.evaluate_rows(bench.get_benchmark("POPE"), rows, predict, circular=True)


# OCRBench .. MMMU, MathVista: tests/test_bench_formats_paper.py
NEWER = ("OCRBench", "ChartQA", "DocVQA_VAL", "InfoVQA_VAL", "VizWiz", "RealWorldQA",
         "HallusionBench", "MME-RealWorld", "MMMU", "MathVista")


@pytest.mark.parametrize("name", [n for n in bench.BENCHMARKS if n not in NEWER])
def test_every_benchmark_scores_prints_and_plots(name, tmp_path):
  """Two categories of two rows each; the second row of each is answered wrong only for the
  yes/no benchmarks (always 'yes')."""
  b = bench.get_benchmark(name)
  cats = ["existence", "code_reasoning"] if name == "MME" else ["c1", "c2"]
  answers = {"POPE": ["yes", "no"], "MME": ["Yes", "No"], "GQA": ["left", "right"],
             "TextVQA_VAL": [["left"] * 10, ["right"] * 10]}.get(name, ["A", "B"])
  said = {"POPE": ["yes", "yes"], "MME": ["Yes", "Yes"]}.get(
      name, ["A", "B"] if b.multiple_choice else ["left", "right"])
  rows = [Row(str(i + 1), "Which side?", answers[i % 2], cats[i // 2],
              options={"A": "left", "B": "right"} if b.multiple_choice else {},
              image_key=str(i // 2), position=i,
              extra={"source": ["ADE20K", "COCO", "Omni3D", "Omni3D"][i]}) for i in range(4)]
  rep = bench.evaluate_rows(b, rows, lambda prompts: [said[i % 2] for i in range(len(prompts))])
  m = rep["metrics"]
  assert m["count"] == 4 and rep["skipped"] == [] and set(rep["categories"]) == set(cats)
  if name == "MME":  # per subtask: acc 50 + acc+ 0
    assert (m["perception"], m["cognition"]) == (50.0, 50.0)
  elif name == "POPE":
    assert (m["accuracy"], m["yes_ratio"], m["recall"]) == (0.5, 1.0, 1.0)
  else:
    assert m.get("accuracy", m.get("vqa_accuracy")) == 1.0
  report = {**rep, "model": "tiny"}
  table = bench.format_table(report)
  assert table.splitlines()[-1].startswith("overall") and cats[1] in table
  bench.plot(report, b, str(tmp_path / "chart.png"))
  assert (tmp_path / "chart.png").stat().st_size > 0
