"""Golden sequences of encode_conversation under both templates, fix-ups and BadSample reasons."""
import pickle
import random

import numpy as np
import pytest

from fusion_jax.data.conversation import (
    IMAGE_SLOT, LATENT_SLOT, LLAMA3_SYSTEM, TEXT, encode_conversation, get_template)
from fusion_jax.data.errors import FIXUP_KEYS, REASON_KEYS, BadSample
from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.data.tokenizer_train import train_bpe_tokenizer_json, train_sentencepiece
from tokenizer_fixtures import WORDS, corpus, llama, phi  # noqa: F401  (pytest fixtures)

PHI_SYS = "<|system|>\nYou are a helpful AI assistant.<|end|>"
L3_SYS = ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" + LLAMA3_SYSTEM
          + "<|eot_id|>")
L3_U = "<|start_header_id|>user<|end_header_id|>\n\n"
L3_A = "<|start_header_id|>assistant<|end_header_id|>\n\n"
VS, VE = "<vision_start>", "<vision_end>"



def render(enc, tok):
  """Segments as text: slots as [IMG] / [LAT], supervised text in {...}."""
  out = []
  for i, s in enumerate(enc.segments):
    if s.kind == IMAGE_SLOT:
      out.append("[IMG]")
    elif s.kind == LATENT_SLOT:
      out.append("[LAT]")
    else:
      t = tok.decode(s.ids, continuation=i > 0)
      out.append("{" + t + "}" if s.supervised else t)
  return "".join(out)


def rec(*turns, image=None, rid="r1"):
  r = {"id": rid, "conversations": [{"from": f, "value": v} for f, v in turns]}
  if image is not None:
    r["image"] = image
  return r


ONE_IMG = rec(("human", "What is in the picture?\n<image>"), ("gpt", "A red cat."), image="a.jpg")
MULTI_TXT = rec(("human", "Is the dog left?"), ("gpt", "yes"), ("human", "What colour?"),
                ("gpt", "blue"))


def test_phi3_single_turn_image(phi):
  enc = encode_conversation(ONE_IMG, phi, "phi_3")
  assert render(enc, phi) == (
      PHI_SYS + f"\n<|user|>\n{VS}[IMG]{VE}{VS}[LAT]{VE}\nWhat is in the picture?<|end|>"
      "\n<|assistant|>\n{A red cat.<|end|>}")
  assert [s.kind for s in enc.segments].count(IMAGE_SLOT) == 1
  # Effective order (docs/model.md §6): the image slot comes before the first latent slot.
  kinds = [s.kind for s in enc.segments if s.kind != TEXT]
  assert kinds == [IMAGE_SLOT, LATENT_SLOT]
  assert len(enc.question_ends) == 1
  assert phi.decode(enc.segments[enc.question_ends[0]].ids, continuation=True) == (
      "\n<|assistant|>\n")
  assert enc.has_image and enc.image == "a.jpg" and enc.id == "r1" and enc.fixups == ()
  # Instruction tokens: the user text without markers, tokenizer defaults (no BOS for this sp).
  assert phi.decode(enc.instructs) == "What is in the picture?"
  assert enc.instructs.tolist() == phi.encode_default("What is in the picture?")


def test_phi3_multi_turn_text_only(phi):
  enc = encode_conversation(MULTI_TXT, phi, "phi_3")
  assert render(enc, phi) == (
      PHI_SYS + f"\n<|user|>\n{VS}[LAT]{VE}Is the dog left?<|end|>\n<|assistant|>\n"
      "{yes<|end|>}" + f"\n<|user|>\n{VS}[LAT]{VE}What colour?<|end|>\n<|assistant|>\n"
      "{blue<|end|>}")
  assert not enc.has_image and enc.image is None and enc.instructs.size == 0
  assert [s.kind for s in enc.segments].count(IMAGE_SLOT) == 0
  assert [enc.segments[i].turn for i in enc.question_ends] == [0, 1]
  assert enc.length(q=4, num_image_tokens=9) == enc.text_length() + 2 * 4


def test_llama3_multi_turn_image(llama):
  r = rec(("human", "<image>\nIs the dog left?"), ("gpt", "yes"), ("human", "What colour?"),
          ("gpt", "blue"), image="b.png")
  enc = encode_conversation(r, llama, "llama_3")
  assert render(enc, llama) == (
      L3_SYS + L3_U + f"{VS}[IMG]{VE}{VS}[LAT]{VE}\nIs the dog left?<|eot_id|>" + L3_A
      + "{yes<|eot_id|>}" + L3_U + f"{VS}[LAT]{VE}What colour?<|eot_id|>" + L3_A
      + "{blue<|eot_id|>}")
  assert enc.segments[0].ids.tolist() == [llama.bos_id]
  # Llama-3 instructs: BOS + both questions concatenated without separator (docs/model.md §4).
  assert enc.instructs.tolist() == llama.encode_default("Is the dog left?What colour?")
  assert enc.instructs[0] == llama.bos_id
  assert enc.length(q=16, num_image_tokens=9) == enc.text_length() + 9 + 2 * 16


def test_llama3_text_only_single_turn_custom_system(llama):
  enc = encode_conversation(rec(("human", "hi"), ("gpt", "yes")), llama, "llama_3",
                            system="Be brief.")
  assert render(enc, llama) == (
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
      + L3_U + f"{VS}[LAT]{VE}hi<|eot_id|>" + L3_A + "{yes<|eot_id|>}")


@pytest.mark.parametrize("template", ["phi_3", "llama_3"])
def test_ids_equal_per_chunk_tokenization(template, phi, llama):
  """Segment ids == tokenizing each text chunk between slots in one call (the authors'
  tokenizer_image_token), BOS on the first chunk only when the tokenizer adds one."""
  tok = phi if template == "phi_3" else llama
  r = rec(("human", "<image>\nWhat is in the picture?"), ("gpt", "A red cat."),
          ("human", "Left or right?"), ("gpt", "Left."), image="a.jpg")
  enc = encode_conversation(r, tok, template)
  chunks, cur = [], []
  for s in enc.segments:
    if s.kind == TEXT:
      cur.extend(s.ids.tolist())
    else:
      chunks.append(cur)
      cur = []
  chunks.append(cur)
  text = render(enc, tok).replace("{", "").replace("}", "")
  texts = text.replace("[IMG]", "\0").replace("[LAT]", "\0").split("\0")
  if tok.add_bos_default:
    texts[0] = texts[0][len(tok.decode([tok.bos_id])):]
  assert len(texts) == len(chunks) == 4
  for k, (t, ids) in enumerate(zip(texts, chunks)):
    assert ids == (tok.encode_default(t) if k == 0 else tok.encode(t))


@pytest.mark.parametrize("value,expected", [
    ("<image>\nWhat is it?", "\nWhat is it?"), ("What is it?\n<image>", "\nWhat is it?"),
    ("What is <image> it?", "\nWhat is  it?"), ("  <image>  ", ""), ("<image>", "")])
def test_image_marker_normalisation(phi, value, expected):
  enc = encode_conversation(rec(("human", value), ("gpt", "yes"), image="x.jpg"), phi, "phi_3")
  assert render(enc, phi) == (PHI_SYS + f"\n<|user|>\n{VS}[IMG]{VE}{VS}[LAT]{VE}" + expected
                              + "<|end|>\n<|assistant|>\n{yes<|end|>}")


def test_fixups(phi):
  enc = encode_conversation(
      rec(("gpt", "hello"), ("human", "hi"), ("gpt", "yes"), ("human", "more?")), phi, "phi_3")
  assert enc.fixups == ("starts_with_gpt", "trailing_human")
  assert render(enc, phi) == (PHI_SYS + f"\n<|user|>\n{VS}[LAT]{VE}hi<|end|>\n<|assistant|>\n"
                              "{yes<|end|>}")
  enc = encode_conversation(rec(("human", " hi "), ("gpt", "yes"), image="i.jpg"), phi, "phi_3")
  assert enc.fixups == ("image_without_marker",)
  assert f"{VS}[IMG]{VE}{VS}[LAT]{VE}\nhi<|end|>" in render(enc, phi)
  enc = encode_conversation(rec(("human", "hi"), ("gpt", "yes"), ("human", "<image> red?"),
                                ("gpt", "no"), image="i.jpg"), phi, "phi_3")
  assert enc.fixups == ("image_marker_moved",)
  assert render(enc, phi).count("[IMG]") == 1
  assert f"{VS}[IMG]{VE}{VS}[LAT]{VE}\nhi<|end|>" in render(enc, phi)
  assert f"{VS}[LAT]{VE}red?<|end|>" in render(enc, phi)
  assert set(enc.fixups) <= FIXUP_KEYS


def test_generation_prompt(phi):
  enc = encode_conversation(rec(("human", "<image>\nWhat?"), image="a.jpg"), phi, "phi_3",
                            add_generation_prompt=True)
  assert render(enc, phi).endswith("What?<|end|>\n<|assistant|>\n")
  assert enc.question_ends == [len(enc.segments) - 1]
  assert not any(s.supervised for s in enc.segments)


@pytest.mark.parametrize("record,reason", [
    ({"id": "x"}, "bad_record"),
    ({"conversations": [{"from": "human"}]}, "bad_record"),
    (rec(("human", "hi"), ("gpt", 3)), "bad_record"),
    (rec(("human", "hi"), ("robot", "x")), "unknown_role"),
    (rec(("human", "hi"), ("human", "again"), ("gpt", "x")), "non_alternating_roles"),
    (rec(("human", "hi")), "no_answer_turn"),
    (rec(("gpt", "hi")), "no_answer_turn"),
    (rec(("human", "hi"), ("gpt", "  ")), "empty_text"),
    (rec(("human", " "), ("gpt", "yes")), "empty_text"),
    (rec(("human", "<image><image>"), ("gpt", "x"), image="a.jpg"), "too_many_image_markers"),
    (rec(("human", "<image>\nhi"), ("gpt", "x")), "image_marker_without_image"),
    (rec(("human", "hi <latent_image>"), ("gpt", "x")), "reserved_marker_in_text"),
    (rec(("human", "hi"), ("gpt", "see <vision_start>")), "reserved_marker_in_text"),
    (rec(("human", "hi"), ("gpt", "<image>"), image="a.jpg"), "reserved_marker_in_text"),
])
def test_bad_samples(phi, record, reason):
  with pytest.raises(BadSample) as e:
    encode_conversation(record, phi, "phi_3", source="data.jsonl:7")
  assert e.value.reason == reason and reason in REASON_KEYS
  assert e.value.source == "data.jsonl:7" and "data.jsonl:7" in str(e.value)


def test_unknown_template_and_pickle(phi):
  with pytest.raises(BadSample, match="unknown_template"):
    encode_conversation(ONE_IMG, phi, "vicuna")
  with pytest.raises(BadSample):
    get_template("chatml")
  err = BadSample("corrupt_image", "cannot decode", "f.jsonl:3")
  back = pickle.loads(pickle.dumps(err))
  assert (back.reason, back.source, str(back)) == (err.reason, err.source, str(err))
  assert isinstance(back, ValueError)


def test_segment_dtypes(phi, llama):
  for tok, tpl in ((phi, "phi_3"), (llama, "llama_3")):
    enc = encode_conversation(ONE_IMG, tok, tpl)
    assert all(s.ids.dtype == np.int32 for s in enc.segments)
    assert enc.instructs.dtype == np.int32
    assert all(s.ids.size == 0 for s in enc.segments if s.kind != TEXT)
