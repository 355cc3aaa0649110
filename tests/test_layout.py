"""layout_sample / layout_batch: fixed shapes, slots, positions, truncation, choose_q."""
import random

import numpy as np
import pytest

from fusion_jax.data.conversation import encode_conversation
from fusion_jax.data.errors import BadSample
from fusion_jax.data.layout import (
    IGNORE_INDEX, LAYOUT_KEYS, check_sample, choose_q, layout_batch, layout_sample)
from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.data.tokenizer_train import train_bpe_tokenizer_json, train_sentencepiece
from fusion_jax.models.query_len import CANDIDATES as QUERY_LEN_CANDIDATES
from example_text import render_example
from tokenizer_fixtures import WORDS, corpus, llama, phi  # noqa: F401  (pytest fixtures)

N_IMG = 9
LQ = 3
T = 12
PHI_SYS = "<|system|>\nYou are a helpful AI assistant.<|end|>"
VS, VE = "<vision_start>", "<vision_end>"



def rec(*turns, image=None):
  r = {"id": "r", "conversations": [{"from": f, "value": v} for f, v in turns]}
  if image:
    r["image"] = image
  return r


IMG3 = rec(("human", "<image>\nWhat is in the picture?"), ("gpt", "A red cat."),
           ("human", "Left or right?"), ("gpt", "Left."), ("human", "Colour?"), ("gpt", "red"),
           image="a.jpg")
TXT2 = rec(("human", "Is the dog left?"), ("gpt", "yes"), ("human", "What colour?"),
           ("gpt", "blue"))


def lay(enc, tok, q=4, seq_len=256, max_questions=LQ, max_instruct_len=T):
  return layout_sample(enc, q=q, num_image_tokens=N_IMG, seq_len=seq_len,
                       max_questions=max_questions, max_instruct_len=max_instruct_len,
                       pad_id=tok.pad_id)


def check_invariants(ex, tok, q, seq_len):
  n = int(ex["token_mask"].sum())
  assert ex["token_mask"][:n].all() and not ex["token_mask"][n:].any()
  assert ex["positions"][:n].tolist() == list(range(n)) and not ex["positions"][n:].any()
  assert (ex["input_ids"][n:] == tok.pad_id).all()
  sup = ex["labels"] != IGNORE_INDEX
  assert (ex["labels"][sup] == ex["input_ids"][sup]).all() and not sup[n:].any()
  lp, qp = ex["latent_pos"], ex["question_pos"]
  assert lp.shape == (LQ * q,) and qp.shape == (LQ,)
  valid_q = qp >= 0
  # Survivors are a prefix; each has q latent slots, all before its question position.
  k = int(valid_q.sum())
  assert valid_q[:k].all() and not valid_q[k:].any()
  assert (lp[k * q:] == -1).all() and (lp[:k * q] >= 0).all()
  for l in range(k):
    blk = lp[l * q:(l + 1) * q]
    assert (np.diff(blk) == 1).all() and blk[-1] < qp[l] < seq_len
    assert (ex["input_ids"][blk] == tok.pad_id).all() and not sup[blk].any()
  if int(ex["image_start"]) >= 0:
    s = int(ex["image_start"])
    assert (ex["input_ids"][s:s + N_IMG] == tok.pad_id).all() and not sup[s:s + N_IMG].any()
    assert ex["has_image"]
  else:
    assert not ex["has_image"]


def test_golden_and_positions(phi):
  enc = encode_conversation(IMG3, phi, "phi_3")
  ex = lay(enc, phi, q=4)
  assert render_example(ex, phi, show_labels=True) == (
      PHI_SYS + f"\n<|user|>\n{VS}[IMG x 9]{VE}{VS}[LAT x 4]{VE}\nWhat is in the picture?<|end|>"
      "\n<|assistant|>\n{A red cat.<|end|>}"
      f"\n<|user|>\n{VS}[LAT x 4]{VE}Left or right?<|end|>\n<|assistant|>\n{{Left.<|end|>}}"
      f"\n<|user|>\n{VS}[LAT x 4]{VE}Colour?<|end|>\n<|assistant|>\n{{red<|end|>}}")
  check_invariants(ex, phi, 4, 256)
  ids = ex["input_ids"]
  s = int(ex["image_start"])
  # <vs> [N image] <ve> <vs> [q latents] <ve>
  assert ids[s - 1] == phi.vision_start_id and ids[s + N_IMG] == phi.vision_end_id
  assert ids[s + N_IMG + 1] == phi.vision_start_id and ex["latent_pos"][0] == s + N_IMG + 2
  # The token after each question position is the first supervised answer token.
  for p in ex["question_pos"]:
    assert ex["labels"][p] == IGNORE_INDEX and ex["labels"][p + 1] != IGNORE_INDEX
    assert phi.decode(ids[p - 2:p + 1]) == "\n<|assistant|>\n"
  # Instructions: first T ids, explicit mask.
  assert ex["instructs_mask"].sum() == min(T, enc.instructs.size)
  assert ex["instructs"][:T].tolist() == enc.instructs[:T].tolist()


def test_shapes_fixed(phi, llama):
  for tok, tpl in ((phi, "phi_3"), (llama, "llama_3")):
    for q in (4, 16):
      shapes = set()
      for r in (IMG3, TXT2, rec(("human", "hi"), ("gpt", "yes"))):
        enc = encode_conversation(r, tok, tpl)
        ex = lay(enc, tok, q=q, seq_len=300)
        assert set(ex) == set(LAYOUT_KEYS)
        check_invariants(ex, tok, q, 300)
        shapes.add(tuple((k, v.shape, v.dtype.str) for k, v in sorted(ex.items())))
      assert len(shapes) == 1
      d = dict((k, (s, t)) for k, s, t in next(iter(shapes)))
      assert d["input_ids"] == ((300,), "<i4") and d["token_mask"][1] == "|b1"
      assert d["latent_pos"][0] == (LQ * q,) and d["instructs"][0] == (T,)
      assert d["has_image"] == ((), "|b1") and d["image_start"] == ((), "<i4")


def test_text_only(llama):
  enc = encode_conversation(TXT2, llama, "llama_3")
  ex = lay(enc, llama, q=16, seq_len=300)
  assert int(ex["image_start"]) == -1 and not ex["has_image"]
  assert not ex["instructs_mask"].any() and not ex["instructs"].any()
  assert (ex["question_pos"] >= 0).sum() == 2
  assert (ex["latent_pos"] >= 0).sum() == 2 * 16
  assert render_example(ex, llama).count("[LAT x 16]") == 2


def test_truncation(phi):
  enc = encode_conversation(IMG3, phi, "phi_3")
  full = lay(enc, phi, q=4)
  qp = full["question_pos"]
  # Cut right after question 1's position: questions 0, 1 survive, 2 does not.
  seq_len = int(qp[1]) + 1
  ex = lay(enc, phi, q=4, seq_len=seq_len)
  check_invariants(ex, phi, 4, seq_len)
  assert ex["token_mask"].all()
  assert ex["question_pos"].tolist() == [qp[0], qp[1], -1]
  assert ex["latent_pos"].tolist() == full["latent_pos"][:8].tolist() + [-1] * 4
  assert (ex["input_ids"] == full["input_ids"][:seq_len]).all()
  assert (ex["labels"] == full["labels"][:seq_len]).all()
  # One position less: question 1 is gone too, its latents are cut from latent_pos.
  ex = lay(enc, phi, q=4, seq_len=seq_len - 1)
  assert ex["question_pos"].tolist() == [qp[0], -1, -1]
  assert (ex["latent_pos"][4:] == -1).all()
  # Too short for any supervised label.
  with pytest.raises(BadSample) as e:
    lay(enc, phi, q=4, seq_len=int(qp[0]) + 1)
  assert e.value.reason == "no_supervised_tokens"


def test_max_questions_drops_later_turns(phi):
  enc = encode_conversation(IMG3, phi, "phi_3")
  full = lay(enc, phi, q=4)
  ex = lay(enc, phi, q=4, max_questions=2)
  assert ex["question_pos"].shape == (2,) and ex["latent_pos"].shape == (8,)
  assert ex["question_pos"].tolist() == full["question_pos"][:2].tolist()
  # The sequence ends with the second answer: the third turn's tokens are dropped too.
  n = int(ex["token_mask"].sum())
  assert render_example(ex, phi).endswith("Left.<|end|>")
  assert (ex["input_ids"][:n] == full["input_ids"][:n]).all()
  assert n < int(full["token_mask"].sum())


def test_q_changes_only_slot_widths(phi):
  enc = encode_conversation(IMG3, phi, "phi_3")
  a, b = lay(enc, phi, q=4), lay(enc, phi, q=16)
  assert int(b["token_mask"].sum()) - int(a["token_mask"].sum()) == 3 * 12
  assert int(a["image_start"]) == int(b["image_start"])
  assert (b["question_pos"] - a["question_pos"]).tolist() == [12, 24, 36]
  assert a["input_ids"][a["labels"] != IGNORE_INDEX].tolist() == \
      b["input_ids"][b["labels"] != IGNORE_INDEX].tolist()


def test_check_sample_monotone(phi):
  enc = encode_conversation(IMG3, phi, "phi_3")
  base = lay(enc, phi, q=4)
  seq_len = int(base["question_pos"][0]) + 30  # answer 0 fits at q=4 ...
  kw = dict(num_image_tokens=N_IMG, seq_len=seq_len, max_questions=LQ)
  check_sample(enc, q_max=4, **kw)
  with pytest.raises(BadSample, match="no_supervised_tokens"):
    check_sample(enc, q_max=144, **kw)  # ... but not at q=144
  for q_max in QUERY_LEN_CANDIDATES:
    try:
      check_sample(enc, q_max=q_max, **kw)
    except BadSample:
      continue
    for q in QUERY_LEN_CANDIDATES:
      if q <= q_max:
        lay(enc, phi, q=q, seq_len=seq_len)  # never raises


def test_layout_batch(phi):
  encs = [encode_conversation(r, phi, "phi_3") for r in (IMG3, TXT2, IMG3)]
  b = layout_batch(encs, 16, num_image_tokens=N_IMG, seq_len=300, max_questions=LQ,
                   max_instruct_len=T, pad_id=phi.pad_id)
  assert b["input_ids"].shape == (3, 300) and b["latent_pos"].shape == (3, 1, LQ * 16)
  assert b["has_image"][:, 0].tolist() == [True, False, True]
  assert b["image_start"][1, 0] == -1 and b["image_start"][0, 0] == b["image_start"][2, 0] >= 0
  assert b["instructs"].shape == (3, 1, T) and b["instructs_mask"].dtype == bool
  assert (b["segment_ids"] == b["token_mask"]).all()  # one sample per row: segment 1
  with pytest.raises(ValueError, match="perfect square"):
    layout_batch(encs, 8, num_image_tokens=N_IMG, seq_len=300, max_questions=LQ,
                 max_instruct_len=T, pad_id=phi.pad_id)


def test_choose_q():
  qs = [choose_q(7, i) for i in range(200)]
  assert qs == [choose_q(7, i) for i in range(200)]  # deterministic
  assert set(qs) == set(QUERY_LEN_CANDIDATES)  # all drawn
  assert qs != [choose_q(8, i) for i in range(200)]  # the seed matters
  assert choose_q(0, 3, (9,)) == 9
  with pytest.raises(ValueError, match="perfect square"):
    choose_q(0, 0, (4, 10))
  with pytest.raises(ValueError):
    choose_q(0, 0, ())


def test_generation_prompt_layout(phi):
  enc = encode_conversation(rec(("human", "<image>\nWhat?"), image="a.jpg"), phi, "phi_3",
                            add_generation_prompt=True)
  with pytest.raises(BadSample, match="no_supervised_tokens"):
    lay(enc, phi)
  ex = layout_sample(enc, q=4, num_image_tokens=N_IMG, seq_len=128, max_questions=LQ,
                     max_instruct_len=T, pad_id=phi.pad_id, require_labels=False)
  n = int(ex["token_mask"].sum())
  # At inference the question position is the last prompt token (docs/model.md §6).
  assert ex["question_pos"].tolist() == [n - 1, -1, -1]
  assert (ex["labels"] == IGNORE_INDEX).all()
  with pytest.raises(ValueError, match="max_questions"):
    lay(enc, phi, max_questions=0)
