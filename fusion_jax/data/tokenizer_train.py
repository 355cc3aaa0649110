"""Training small tokenizers of the two styles fusion_jax.data.tokenizer loads.

`train_sentencepiece` trains a Phi-3.5-style byte-fallback sentencepiece model with its
added-token config (the main job trains one on the synthesized captions);
`train_bpe_tokenizer_json` a Llama-3-style byte-level BPE `tokenizer.json` (tests). Both write
what `load_tokenizer(dir)` reloads exactly.
"""
from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Sequence

from fusion_jax.data.tokenizer import (PHI3_CHAT_TOKENS, VISION_END, VISION_START,
                                       check_no_placeholder)


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int, *,
                        added_tokens: Sequence[str] = PHI3_CHAT_TOKENS + (VISION_START, VISION_END),
                        model_type: str = "bpe", add_bos_token: bool = False,
                        pad_token: str = "<unk>", eos_token: str = "<|endoftext|>",
                        character_coverage: float = 1.0) -> str:
  """Trains a small Phi-3.5-style sentencepiece tokenizer; returns the `.model` path.

  Writes `{out_prefix}.model` and, next to it, a `tokenizer_config.json` (HF format) listing
  the added tokens with ids after the sp vocabulary, bos/eos/pad/unk and `add_bos_token`, so
  `load_tokenizer(dirname(out_prefix))` (use out_prefix `<dir>/tokenizer`) reloads it exactly.
  Special tokens are never learned by sentencepiece: they are added tokens split out before
  sentencepiece runs (the same path a real Phi-3.5 tokenizer takes). Byte fallback makes
  every text encodable; identity normalisation keeps newlines and repeated spaces.

  Args:
    texts: training sentences (newlines inside a text are kept).
    vocab_size: sentencepiece vocabulary size (>= 260 + distinct characters is safe; smaller
      corpora may give fewer pieces, the limit is soft).
  """
  import sentencepiece as spm

  out_dir = os.path.dirname(os.path.abspath(out_prefix))
  os.makedirs(out_dir, exist_ok=True)
  model = io.BytesIO()
  sentences = [t for t in texts if t]
  if not sentences:
    raise ValueError("train_sentencepiece: no training text")
  for t in sentences:
    check_no_placeholder(t)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type=model_type, byte_fallback=True, hard_vocab_limit=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      split_digits=True, allow_whitespace_only_pieces=True,
      character_coverage=character_coverage, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      max_sentence_length=1 << 16, minloglevel=2, num_threads=1)
  path = out_prefix + ".model"
  with open(path, "wb") as f:
    f.write(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  n = sp.get_piece_size()
  decoder = {str(i): {"content": sp.id_to_piece(i), "special": True} for i in (0, 1, 2)}
  for k, t in enumerate(dict.fromkeys(added_tokens)):
    decoder[str(n + k)] = {"content": t, "special": True}
  cfg = {
      "added_tokens_decoder": decoder, "bos_token": "<s>", "unk_token": "<unk>",
      "eos_token": eos_token if eos_token in added_tokens else "</s>",
      "pad_token": pad_token, "add_bos_token": add_bos_token, "add_eos_token": False,
      "legacy": False, "tokenizer_class": "LlamaTokenizer",
  }
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=1)
  return path


# Llama-3's special tokens in their id order (128000 + k there, n_bpe + k in a tiny tokenizer).
LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>")


def train_bpe_tokenizer_json(texts: Iterable[str], out_dir: str, vocab_size: int, *,
                             special_tokens: Sequence[str] = LLAMA3_SPECIAL_TOKENS,
                             bos_token: str = "<|begin_of_text|>",
                             eos_token: str = "<|eot_id|>",
                             pad_token: str = "<|reserved_special_token_0|>") -> str:
  """Trains a small Llama-3-style byte-level BPE `tokenizer.json`; returns its path.

  Special tokens get ids right after the BPE vocabulary, in the order given (Llama-3's order
  by default, so `<|reserved_special_token_0|>` is n+2 like 128002). The post-processor
  prepends BOS (Llama-3's default), and a `tokenizer_config.json` names bos/eos/pad.
  `<vision_start>` / `<vision_end>` are NOT added here: `HFTokenizer` adds them on load, as
  for a real Llama-3 checkpoint.
  """
  from tokenizers import Tokenizer as _HFTok
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  sentences = [t for t in texts if t]
  if not sentences:
    raise ValueError("train_bpe_tokenizer_json: no training text")
  for t in sentences:
    check_no_placeholder(t)
  tok = _HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(sentences, trainer)
  tok.add_special_tokens(list(special_tokens))
  bos_id = tok.token_to_id(bos_token)
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos_token} $A", pair=f"{bos_token} $A $B",
                                    special_tokens=[(bos_token, bos_id)]),
  ])
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "tokenizer.json")
  tok.save(path)
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"bos_token": bos_token, "eos_token": eos_token, "pad_token": pad_token}, f,
              indent=1)
  return path
