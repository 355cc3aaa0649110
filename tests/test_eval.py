"""Closed-answer evaluation: candidate sequences, scores, per-category summary."""
import dataclasses
import json
import os

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax.eval import closed_qa
from fusion_jax.models import batch_spec, fusion
from fusion_jax.models.presets import TINY
from tests.pipeline_fixtures import make_tokenizer

SEQ, LQ, Q = 256, 3, 4


def _records(root):
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  Image.new("RGB", (40, 30), (200, 10, 10)).save(os.path.join(root, "img", "a.png"))
  colors = ["red", "blue", "green"]
  return [
      {"id": "a", "image": "img/a.png", "category": "SynthColor",
       "conversations": [{"from": "human", "value": "<image>\nWhat color is the ball?"},
                         {"from": "gpt", "value": "red"}],
       "qa": [{"answer": "red", "answer_type": "color", "candidates": colors}]},
      {"id": "b", "image": "img/a.png", "category": "SynthCount",
       "conversations": [{"from": "human", "value": "<image>\nHow many cats?"},
                         {"from": "gpt", "value": "3"},
                         {"from": "human", "value": "Describe the scene."},
                         {"from": "gpt", "value": "a scene"},
                         {"from": "human", "value": "Is the ball red?"},
                         {"from": "gpt", "value": "yes"}],
       "qa": [{"answer": "3", "answer_type": "count", "candidates": ["1", "2", "3", "4"]},
              None, {"answer": "yes", "answer_type": "yes_no", "candidates": ["yes", "no"]}]},
  ]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("eval"))
  tok = make_tokenizer(root)
  cfg = dataclasses.replace(TINY, llm=TINY.llm.replace(vocab_size=len(tok), pad_token_id=tok.pad_id),
                            template="phi_3")
  batch = fusion.example_batch(cfg, batch_size=2, seq_len=SEQ, max_questions=LQ, q=Q)
  params = nn.meta.unbox(fusion.init(jax.random.key(0), cfg, batch)["params"])
  return root, tok, cfg, params, _records(root)


def test_questions_and_candidate_labels(setup):
  root, tok, cfg, _, records = setup
  qs = closed_qa.closed_questions(records)
  assert [(q.record_index, q.turn, q.answer) for q in qs] == [(0, 0, 0), (1, 0, 2), (1, 2, 0)]
  examples, owners, skipped = closed_qa.build_examples(
      records, qs, tok, template="phi_3", q=Q, num_image_tokens=cfg.num_image_tokens,
      seq_len=SEQ, max_questions=LQ, max_instruct_len=cfg.max_instruct_len)
  assert len(examples) == 3 + 4 + 2 and len(owners) == 9 and skipped == []
  # With room for two questions only, the third question is reported as skipped.
  _, owners2, skipped2 = closed_qa.build_examples(
      records, qs, tok, template="phi_3", q=Q, num_image_tokens=cfg.num_image_tokens,
      seq_len=SEQ, max_questions=2, max_instruct_len=cfg.max_instruct_len)
  assert skipped2 == [2] and len(owners2) == 7
  for ex, (qi, ci) in zip(examples, owners):
    sup = ex["labels"][ex["labels"] >= 0]
    assert tok.decode(sup) == qs[qi].candidates[ci] + "<|end|>"
  # The third question sees the ground-truth earlier answers in its prefix.
  last = examples[-1]
  text = tok.decode(last["input_ids"][last["token_mask"] & (last["input_ids"] != tok.pad_id)])
  assert "3<|end|>" in text and "a scene<|end|>" in text


def test_summarize_counts_and_chance():
  qs = [closed_qa.Question(0, 0, "A", "color", ("x", "y"), 1),
        closed_qa.Question(1, 0, "A", "color", ("x", "y", "z", "w"), 0),
        closed_qa.Question(2, 0, "B", "count", ("1", "2"), 0)]
  owners = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
  scores = np.array([-2.0, -1.0, -5.0, -1.0, -3.0, -4.0, -0.5, -0.1])
  rep = closed_qa.summarize(qs, scores, owners)
  # Predictions: "y" (right), "y" (wrong), "2" (wrong).
  assert rep["A"] == {"accuracy": 0.5, "chance": (0.5 + 0.25) / 2, "count": 2, "skipped": 0,
                      "top": "y", "top_share": 1.0}
  assert rep["B"]["accuracy"] == 0.0 and rep["all"]["count"] == 3
  assert list(rep)[-1] == "all"
  assert "x chance" in closed_qa.format_table(rep)
  kinds = closed_qa.summarize(qs, scores, owners, by="answer_type")
  assert list(kinds) == ["color", "count", "all"]
  assert kinds["color"]["accuracy"] == 0.5 and kinds["color"]["count"] == 2
  assert kinds["all"]["top"] == "y" and kinds["all"]["top_share"] == pytest.approx(2 / 3)
  # The third question did not fit: counted as skipped in its kind, never scored.
  kinds = closed_qa.summarize(qs, scores[:6], owners[:6], skipped=[2], by="answer_type")
  assert kinds["count"] == {"accuracy": 0.0, "chance": 0.0, "count": 0, "skipped": 1,
                            "top": "", "top_share": 0.0}
  assert kinds["all"]["count"] == 2 and kinds["all"]["skipped"] == 1
  assert "'y' (100%)" in closed_qa.format_table(kinds, group="answer kind")


def test_scores_are_negative_summed_cross_entropy(setup):
  root, tok, cfg, params, records = setup
  report = closed_qa.evaluate(params, cfg, records, tok, image_root=root, q=Q, seq_len=SEQ,
                              max_questions=LQ, batch_size=4)
  assert report["SynthColor"]["count"] == 1 and report["SynthCount"]["count"] == 2
  assert report["all"]["chance"] == pytest.approx((1 / 3 + 1 / 4 + 1 / 2) / 3)
  qs = closed_qa.closed_questions(records)
  examples, _, _ = closed_qa.build_examples(
      records, qs, tok, template="phi_3", q=Q, num_image_tokens=cfg.num_image_tokens,
      seq_len=SEQ, max_questions=LQ, max_instruct_len=cfg.max_instruct_len)
  load = closed_qa.image_loader(records, root, cfg.vision.image_size)
  scores = closed_qa.score_examples(params, cfg, examples[:2], load, batch_size=2)
  ex = examples[1]
  batch = batch_spec.stack_examples([dict(ex, images=load(int(ex["record_index"])))])
  _, aux = jax.jit(lambda p, b: fusion.loss_fn(p, b, cfg, train=False))(params, batch)
  np.testing.assert_allclose(scores[1], -float(aux["ce_sum"]), rtol=1e-5)
  closed_qa.plot_report(report, os.path.join(root, "acc.png"))
  assert os.path.getsize(os.path.join(root, "acc.png")) > 0
