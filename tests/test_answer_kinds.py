"""benchmarks/answer_kinds.py: accuracy and the most frequent answer per kind of question."""
import pytest

from experiment_helpers import load_benchmark
from fusion_jax.eval.closed_qa import Question


def test_rows_group_by_category_and_kind_and_show_constant_answers():
  lr = ("left", "right", "above", "below")
  qs = [Question(0, 0, "SynthSpatial", "spatial", lr, 0),
        Question(1, 0, "SynthSpatial", "spatial", lr, 1),
        Question(2, 0, "SynthConvShort", "spatial", lr, 1),
        Question(2, 1, "SynthConvShort", "yes_no", ("yes", "no"), 0),
        Question(3, 0, "SynthConvShort", "yes_no", ("yes", "no"), 1)]
  predicted = [1, 1, 1, 1, None]  # always "right" / "no"; the last question was skipped
  rows = {(r["category"], r["kind"]): r for r in load_benchmark("answer_kinds").rows_by_kind(qs, predicted)}
  assert list(rows) == [("SynthConvShort", "spatial"), ("SynthConvShort", "yes_no"),
                        ("SynthSpatial", "spatial"), ("*", "spatial"), ("*", "yes_no")]
  sp = rows[("*", "spatial")]
  assert (sp["n"], sp["top"], sp["top_share"]) == (3, "right", 1.0)
  assert sp["accuracy"] == pytest.approx(2 / 3) and sp["chance"] == pytest.approx(0.25)
  yn = rows[("SynthConvShort", "yes_no")]
  assert (yn["n"], yn["accuracy"], yn["chance"]) == (1, 0.0, 0.5)
