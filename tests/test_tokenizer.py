"""Tokenizer backends: special tokens are single ids, placeholders are never tokens, spans."""
import json
import os
import pickle

import numpy as np
import pytest

from fusion_jax.data.tokenizer import (PHI3_CHAT_TOKENS, HFTokenizer, SentencePieceTokenizer,
                                       load_tokenizer)
from fusion_jax.data.tokenizer_train import (LLAMA3_SPECIAL_TOKENS, train_bpe_tokenizer_json,
                                             train_sentencepiece)
from tokenizer_fixtures import WORDS, corpus  # noqa: F401



@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("sp")
  train_sentencepiece(corpus(), str(d / "tokenizer"), 320)
  return str(d)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("hf")
  train_bpe_tokenizer_json(corpus(), str(d), 400)
  return str(d)


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
  return load_tokenizer(sp_dir)


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
  return load_tokenizer(hf_dir)


TEXTS = ["<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\nWhat is  in it?<|end|>",
         "hello there <|user|> x\n\n<|end|>", "<|user|>\nhi", "naïve café 日本 🐱",
         "a<vision_start><vision_end>b", "tabs\tand\n\nnewlines  two  spaces"]


def test_load_dispatch(sp_dir, hf_dir, tmp_path):
  assert isinstance(load_tokenizer(sp_dir), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(os.path.join(sp_dir, "tokenizer.model")), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(hf_dir), HFTokenizer)
  assert isinstance(load_tokenizer(os.path.join(hf_dir, "tokenizer.json")), HFTokenizer)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))
  with pytest.raises(FileNotFoundError):
    load_tokenizer(str(tmp_path / "nope.model"))
  (tmp_path / "vocab.txt").write_text("x")
  with pytest.raises(ValueError, match="unknown tokenizer file type"):
    load_tokenizer(str(tmp_path / "vocab.txt"))


def test_sp_special_ids_after_vocab(sp_tok):
  n_sp = sp_tok._sp.get_piece_size()
  names = PHI3_CHAT_TOKENS + ("<vision_start>", "<vision_end>")
  expected = {t: n_sp + k for k, t in enumerate(names)}
  assert sp_tok.added_tokens == expected
  assert sp_tok.vocab_size == n_sp + len(expected)
  assert sp_tok.vision_start_id == expected["<vision_start>"]
  assert sp_tok.vision_end_id == expected["<vision_end>"]
  for t, i in expected.items():
    assert sp_tok.encode(t) == [i]
    assert sp_tok.token_to_id(t) == i and sp_tok.id_to_token(i) == t
  assert (sp_tok.pad_id, sp_tok.bos_id, sp_tok.eos_id) == (0, 1, expected["<|endoftext|>"])
  assert not sp_tok.add_bos_default
  assert sp_tok.decode([1, 0, 2]) == "<s><unk></s>"
  assert sp_tok.decode([1] + sp_tok.encode("red") + [2], skip_special_tokens=True) == "red"
  assert sp_tok.token_to_id("<not-a-token>") is None


def test_hf_special_ids(hf_tok):
  first = hf_tok.token_to_id(LLAMA3_SPECIAL_TOKENS[0])
  for k, t in enumerate(LLAMA3_SPECIAL_TOKENS):
    assert hf_tok.encode(t) == [first + k]  # Llama-3's relative order (128000 + k)
  # <vision_start>/<vision_end> added on load, right after the vocabulary.
  assert hf_tok.vision_start_id == first + len(LLAMA3_SPECIAL_TOKENS)
  assert hf_tok.vision_end_id == hf_tok.vision_start_id + 1
  assert hf_tok.vocab_size == hf_tok.vision_end_id + 1
  assert hf_tok.encode("<vision_start>x<vision_end>")[::2] == [hf_tok.vision_start_id,
                                                               hf_tok.vision_end_id]
  assert hf_tok.pad_id == hf_tok.token_to_id("<|reserved_special_token_0|>") == first + 2
  assert hf_tok.bos_id == first and hf_tok.eos_id == hf_tok.token_to_id("<|eot_id|>")
  assert hf_tok.add_bos_default
  assert hf_tok.encode_default("red cat")[0] == hf_tok.bos_id
  assert hf_tok.encode("red cat")[0] != hf_tok.bos_id
  ids = hf_tok.encode("red", add_bos=True, add_eos=True)
  assert ids == [hf_tok.bos_id] + hf_tok.encode("red") + [hf_tok.eos_id]


@pytest.mark.parametrize("backend", ["sp", "hf"])
def test_roundtrip_and_placeholders(backend, sp_tok, hf_tok):
  tok = sp_tok if backend == "sp" else hf_tok
  for t in TEXTS:
    assert tok.decode(tok.encode(t)) == t
  for bad in ("look <image> here", "x<latent_image>"):
    for fn in (tok.encode, tok.encode_default, lambda s: tok.encode_spans([s])):
      with pytest.raises(ValueError, match="placeholder"):
        fn(bad)
  # Placeholder-looking text never maps to an id.
  assert tok.token_to_id("<image>") is None and tok.token_to_id("<latent_image>") is None


@pytest.mark.parametrize("backend", ["sp", "hf"])
def test_encode_spans_is_whole_string_tokenization(backend, sp_tok, hf_tok):
  tok = sp_tok if backend == "sp" else hf_tok
  pieces = ["<|user|>\n", "What is in the picture?", "<|end|>", "\n<|assistant|>\n",
            "A red cat.", "<|end|>", "", "two  spaces"]
  spans = tok.encode_spans(pieces)
  assert len(spans) == len(pieces) and all(s.dtype == np.int32 for s in spans)
  assert np.concatenate(spans).tolist() == tok.encode("".join(pieces))
  assert spans[6].size == 0
  for p, s in zip(pieces, spans):
    if p in ("<|end|>",) or p.startswith("<|user|>"):
      continue
    # Each span decodes to its own piece (continuation: no sentencepiece dummy prefix).
    assert tok.decode(s, continuation=True) == p


def test_sp_dummy_prefix_like_hf_legacy_false(sp_tok):
  # Prefix only at the start of the text, never after an added token.
  first = sp_tok.encode("red cat")
  assert sp_tok.id_to_token(first[0]).startswith("▁")
  after = sp_tok.encode("<|user|>red cat")[1:]
  assert not sp_tok.id_to_token(after[0]).startswith("▁")


def test_sp_matches_transformers_llama_tokenizer(sp_dir, sp_tok):
  """Same ids as HF's LlamaTokenizer(legacy=False) (the Phi-3.5 tokenizer class)."""
  import transformers
  ht = transformers.LlamaTokenizer.from_pretrained(sp_dir, legacy=False)
  ht.add_tokens(["<vision_start>", "<vision_end>"], special_tokens=True)
  for t in TEXTS:
    ids = sp_tok.encode(t)
    assert ht(t, add_special_tokens=False).input_ids == ids, t
    for skip in (False, True):
      full = [sp_tok.bos_id] + ids + [2]
      ours = sp_tok.decode(full, skip_special_tokens=skip)
      assert ht.decode(full, skip_special_tokens=skip) == ours
  # Known, deliberate difference: a text that STARTS with a space. HF merges it into the
  # dummy prefix (lossy); we keep it. Templates never start with a space.
  assert sp_tok.decode(sp_tok.encode(" x")) == " x"


def test_added_tokens_from_hf_config(tmp_path, sp_dir):
  """A Phi-3.5-like tokenizer_config.json with explicit ids (and gaps) is honoured."""
  import shutil
  shutil.copy(os.path.join(sp_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
  n = SentencePieceTokenizer(os.path.join(sp_dir, "tokenizer.model"))._sp.get_piece_size()
  cfg = {"added_tokens_decoder": {
      "0": {"content": "<unk>"}, "1": {"content": "<s>"}, "2": {"content": "</s>"},
      str(n): {"content": "<|endoftext|>"}, str(n + 1): {"content": "<|assistant|>"},
      str(n + 6): {"content": "<|system|>"}, str(n + 7): {"content": "<|end|>"},
      str(n + 10): {"content": "<|user|>"}},
      "bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<unk>",
      "add_bos_token": True}
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
  tok = load_tokenizer(str(tmp_path))
  assert tok.encode("<|user|>") == [n + 10] and tok.encode("<|system|>") == [n + 6]
  assert (tok.vision_start_id, tok.vision_end_id) == (n + 11, n + 12)  # len(tokenizer) order
  assert tok.vocab_size == n + 13
  assert tok.add_bos_default and tok.encode_default("red")[0] == 1
  bad = dict(cfg, added_tokens_decoder={"5": {"content": "<|user|>"}})
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(bad))
  with pytest.raises(ValueError, match="inside the sentencepiece vocabulary"):
    load_tokenizer(str(tmp_path))


@pytest.mark.parametrize("backend", ["sp", "hf"])
def test_pickle(backend, sp_tok, hf_tok):
  """Grain ships the tokenizer to worker processes."""
  tok = sp_tok if backend == "sp" else hf_tok
  back = pickle.loads(pickle.dumps(tok))
  for t in TEXTS:
    assert back.encode(t) == tok.encode(t)
  assert (back.pad_id, back.vision_start_id, back.vocab_size) == (
      tok.pad_id, tok.vision_start_id, tok.vocab_size)


def test_hf_config_add_bos_token_overrides_post_processor(tmp_path, hf_dir):
  import shutil
  shutil.copy(os.path.join(hf_dir, "tokenizer.json"), tmp_path / "tokenizer.json")
  cfg = json.loads(open(os.path.join(hf_dir, "tokenizer_config.json")).read())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token=False)))
  tok = load_tokenizer(str(tmp_path))
  assert not tok.add_bos_default and tok.encode_default("red cat") == tok.encode("red cat")
