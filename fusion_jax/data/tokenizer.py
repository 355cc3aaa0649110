"""One tokenizer interface over two backends: sentencepiece `.model` and HF `tokenizer.json`.

Backends:
  * `SentencePieceTokenizer` (Phi-3.5 style): a sentencepiece model plus *added tokens*
    (`<|user|>`, `<|assistant|>`, `<|end|>`, `<|system|>`, `<vision_start>`, ...) that
    sentencepiece itself does not know. Like HF's slow tokenizers we split the text on the
    added-token strings first (longest match wins) and map them to their ids, which sit after
    the sentencepiece vocabulary. Added tokens come from a `tokenizer_config.json` next to the
    model (HF `added_tokens_decoder` format, so a Phi-3.5 checkpoint directory just works) or
    from the constructor. Dummy-prefix rule = HF `legacy=False`: a "▁" is prepended only when
    the whole text starts with ordinary text, never to text that follows an added token.
  * `HFTokenizer` (Llama-3 style): the `tokenizers` library on a `tokenizer.json`.

Both add `<vision_start>` / `<vision_end>` as special tokens when absent, with ids appended
after the current vocabulary (what the authors' `tokenizer.add_tokens(...)` +
`resize_token_embeddings(len(tokenizer))` does, so imported checkpoints line up).

The image placeholders `<image>` and `<latent_image>` are NOT tokens: they mark slots that the
data pipeline fills with image / latent positions. `encode` refuses text containing them, so
they can never leak into a sequence as text.

`load_tokenizer(path)` picks the backend from the path (a directory holding both files, like
a Phi-3.5 checkpoint, uses tokenizer.json: the HF fast tokenizer is the reference).
Training small tokenizers of either style: fusion_jax/data/tokenizer_train.py.
"""
from __future__ import annotations

import abc
import bisect
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

VISION_START = "<vision_start>"
VISION_END = "<vision_end>"
IMAGE_MARKER = "<image>"
LATENT_MARKER = "<latent_image>"
PLACEHOLDERS: tuple[str, ...] = (IMAGE_MARKER, LATENT_MARKER)

# Phi-3.5-mini's chat tokens (the real model has more, read from its tokenizer_config.json).
PHI3_CHAT_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>")

_BOS_CANDIDATES = ("<|begin_of_text|>", "<s>")
_EOS_CANDIDATES = ("<|eot_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>")
_PAD_CANDIDATES = ("<|reserved_special_token_0|>", "<unk>", "<pad>")
# FUSION's padding token per template (docs/model.md §9). Phi-3.5's tokenizer_config names
# <|endoftext|> as pad, but the authors pad with <unk> (id 0); pass these as `pad_token=`.
TEMPLATE_PAD_TOKENS = {"phi_3": "<unk>", "llama_3": "<|reserved_special_token_0|>"}


def check_no_placeholder(text: str) -> None:
  for p in PLACEHOLDERS:
    if p in text:
      raise ValueError(
          f"tokenizer: text contains the placeholder {p!r}; placeholders mark image/latent "
          "slots and must be split out before tokenizing (see fusion_jax/data/conversation.py)")


def _read_json(path: str) -> dict[str, Any]:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _token_content(tok: Any) -> str | None:
  """tokenizer_config.json stores tokens as a string or as {"content": ...}."""
  if tok is None:
    return None
  if isinstance(tok, Mapping):
    return tok.get("content")
  return str(tok)


class Tokenizer(abc.ABC):
  """The interface every backend implements.

  Attributes:
    vocab_size: number of ids (base vocabulary + added tokens); the embedding needs at least
      this many rows.
    bos_id, eos_id: ids of the begin / end of text tokens (eos is the tokenizer's end token,
      the chat templates define their own end-of-turn tokens).
    pad_id: id written at slot and padding positions (Phi: `<unk>` 0, Llama-3:
      `<|reserved_special_token_0|>` 128002).
    vision_start_id, vision_end_id: ids of `<vision_start>` / `<vision_end>`.
    add_bos_default: whether the tokenizer's defaults (HF `add_special_tokens=True`) prepend
      BOS; used for the instruction tokens (docs/model.md §4: Llama-3 adds BOS).
  """

  vocab_size: int
  bos_id: int | None
  eos_id: int | None
  pad_id: int
  vision_start_id: int
  vision_end_id: int
  add_bos_default: bool

  def __len__(self) -> int:
    return self.vocab_size

  # --- backend-specific ---------------------------------------------------------------------
  @abc.abstractmethod
  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """Ids of `text` (no BOS/EOS) and, per id, the char index where its surface starts."""

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
             continuation: bool = False) -> str:
    """Text of `ids`; added/special tokens rendered as their strings unless skipped.

    continuation: the ids continue a longer sequence, so a leading "▁" is a real space, not a
    sentencepiece dummy prefix (decoding a sequence piecewise then concatenates exactly).
    """

  @abc.abstractmethod
  def token_to_id(self, token: str) -> int | None:
    """Id of a whole token string (special or ordinary), None if not in the vocabulary."""

  @abc.abstractmethod
  def id_to_token(self, idx: int) -> str:
    """Token string of an id."""

  # --- shared -------------------------------------------------------------------------------
  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of `text`; no BOS/EOS unless asked. Special-token strings map to their ids.

    Raises ValueError if `text` contains an image placeholder (`<image>`, `<latent_image>`).
    """
    check_no_placeholder(text)
    ids, _ = self._encode_with_offsets(text)
    if add_bos:
      if self.bos_id is None:
        raise ValueError("tokenizer: add_bos=True but the tokenizer has no BOS token")
      ids = [self.bos_id] + ids
    if add_eos:
      if self.eos_id is None:
        raise ValueError("tokenizer: add_eos=True but the tokenizer has no EOS token")
      ids = ids + [self.eos_id]
    return ids

  def encode_default(self, text: str) -> list[int]:
    """`text` tokenized with the tokenizer's defaults (HF `tokenizer(text).input_ids`)."""
    return self.encode(text, add_bos=self.add_bos_default)

  def encode_spans(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Tokenizes ''.join(texts) in ONE pass and splits the ids back per text.

    This gives the ids a whole-string tokenization would give (merges, dummy prefix) while
    telling which ids come from which piece, so labels can be set by construction. A token
    whose surface straddles a boundary belongs to the piece holding its first character (rare:
    template boundaries sit next to special tokens or newlines). No BOS/EOS.

    Returns:
      one int32 array per text (possibly empty).
    """
    full = "".join(texts)
    check_no_placeholder(full)
    ids, starts = self._encode_with_offsets(full)
    bounds = np.cumsum([len(t) for t in texts])[:-1].tolist()
    owner = [bisect.bisect_right(bounds, s) for s in starts]
    out: list[list[int]] = [[] for _ in texts]
    for i, o in zip(ids, owner):
      out[o].append(i)
    return [np.asarray(x, dtype=np.int32) for x in out]


def _token_regex(tokens: Sequence[str]) -> re.Pattern | None:
  """Alternation of the token strings, longest first (so the longest match wins)."""
  if not tokens:
    return None
  return re.compile("(" + "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
                    + ")")


def _split_on_tokens(text: str, pattern: re.Pattern | None) -> list[tuple[str, bool]]:
  """Splits text into (piece, is_token) pieces; empty pieces are dropped."""
  if pattern is None:
    return [(text, False)] if text else []
  parts = pattern.split(text)
  # re.split with one capture group alternates text, token, text, token, ...
  return [(p, k % 2 == 1) for k, p in enumerate(parts) if p]


def _byte_to_char(text: str) -> np.ndarray:
  """For each UTF-8 byte offset of `text` (and the end), the index of its character."""
  if text.isascii():
    return np.arange(len(text) + 1)
  b = np.frombuffer(text.encode("utf-8"), np.uint8)
  starts = (b & 0xC0) != 0x80  # not a continuation byte
  return np.concatenate([np.cumsum(starts) - 1, [len(text)]])


class SentencePieceTokenizer(Tokenizer):
  """sentencepiece model + added tokens with ids after the sentencepiece vocabulary.

  Args:
    model_path: the `.model` file.
    added_tokens: {token string: id} or a sequence of strings (ids appended in order after
      the sp vocabulary). Defaults to what `tokenizer_config.json` next to the model lists.
    bos_token, eos_token, pad_token: token strings; default from tokenizer_config.json, else
      the sp model's bos/eos and `<unk>` for padding (Phi-3.5's pad).
    add_bos_default: the tokenizer's default for prepending BOS (config `add_bos_token`,
      HF LlamaTokenizer's default True otherwise).
  """

  def __init__(self, model_path: str, *,
               added_tokens: Mapping[str, int] | Sequence[str] | None = None,
               bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None, add_bos_default: bool | None = None):
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    with open(model_path, "rb") as f:
      proto = f.read()
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    # Same model without the dummy prefix: used for text that follows an added token and for
    # decoding runs that do not start the sequence (HF legacy=False behaviour).
    mp = sentencepiece_model_pb2.ModelProto()
    mp.ParseFromString(proto)
    mp.normalizer_spec.add_dummy_prefix = False
    self._sp_cont = spm.SentencePieceProcessor(model_proto=mp.SerializeToString())
    self._sp_size = self._sp.get_piece_size()

    cfg_path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    if added_tokens is None:
      decoder = cfg.get("added_tokens_decoder", {})
      added_tokens = {_token_content(v): int(k) for k, v in decoder.items()}
    if not isinstance(added_tokens, Mapping):
      added_tokens = {t: self._sp_size + i for i, t in enumerate(added_tokens)}
    self._added: dict[str, int] = {}
    for tok, idx in added_tokens.items():
      # Entries that merely name sp pieces (<unk>, <s>, </s> in HF configs) are not "added".
      if idx < self._sp_size and self._sp.id_to_piece(idx) == tok:
        continue
      if idx < self._sp_size:
        raise ValueError(f"{model_path}: added token {tok!r} has id {idx} inside the "
                         f"sentencepiece vocabulary ({self._sp_size}); fix tokenizer_config.json")
      self._added[tok] = int(idx)
    for tok in (VISION_START, VISION_END):
      if tok not in self._added:
        self._added[tok] = max([self._sp_size - 1, *self._added.values()]) + 1
    self._added_by_id = {v: k for k, v in self._added.items()}
    if len(self._added_by_id) != len(self._added):
      raise ValueError(f"{model_path}: two added tokens share an id: {self._added}")
    self._added_re = _token_regex(tuple(self._added))
    self.vocab_size = max([self._sp_size - 1, *self._added.values()]) + 1

    def pick(explicit, key, fallback):
      name = explicit or _token_content(cfg.get(key))
      if name is None:
        return fallback
      idx = self.token_to_id(name)
      if idx is None:
        raise ValueError(f"{model_path}: {key} {name!r} is not in the vocabulary")
      return idx

    sp_bos = self._sp.bos_id() if self._sp.bos_id() >= 0 else None
    sp_eos = self._sp.eos_id() if self._sp.eos_id() >= 0 else None
    self.bos_id = pick(bos_token, "bos_token", sp_bos)
    self.eos_id = pick(eos_token, "eos_token", sp_eos)
    unk = self._sp.unk_id()
    self.pad_id = pick(pad_token, "pad_token", unk)
    self.vision_start_id = self._added[VISION_START]
    self.vision_end_id = self._added[VISION_END]
    if add_bos_default is None:
      add_bos_default = bool(cfg.get("add_bos_token", True))
    self.add_bos_default = add_bos_default and self.bos_id is not None

  @property
  def added_tokens(self) -> dict[str, int]:
    return dict(self._added)

  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    starts: list[int] = []
    pos = 0
    for k, (piece, is_tok) in enumerate(_split_on_tokens(text, self._added_re)):
      if is_tok:
        ids.append(self._added[piece])
        starts.append(pos)
      else:
        sp = self._sp if k == 0 else self._sp_cont
        proto = sp.encode(piece, return_type="proto")
        # sentencepiece offsets are UTF-8 byte offsets; map them to char offsets.
        b2c = _byte_to_char(piece)
        for p in proto.pieces:
          ids.append(p.id)
          starts.append(pos + int(b2c[p.begin]))
      pos += len(piece)
    return ids, starts

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
             continuation: bool = False) -> str:
    out: list[str] = []
    run: list[int] = []
    first = not continuation

    def flush():
      nonlocal first
      if run:
        sp = self._sp if first else self._sp_cont
        out.append(sp.decode(run))
        run.clear()
        first = False

    def special(text):
      nonlocal first
      flush()
      if not skip_special_tokens:  # a skipped special token leaves the start a start (as HF)
        out.append(text)
        first = False

    for i in ids:
      i = int(i)
      if i in self._added_by_id:
        special(self._added_by_id[i])
      elif 0 <= i < self._sp_size:
        if self._sp.is_control(i) or self._sp.is_unknown(i):
          special(self._sp.id_to_piece(i))  # <s>, </s>, <unk> as strings, like HF
        else:
          run.append(i)
      else:
        raise ValueError(f"tokenizer: id {i} is outside the vocabulary ({self.vocab_size})")
    flush()
    return "".join(out)

  def token_to_id(self, token: str) -> int | None:
    if token in self._added:
      return self._added[token]
    idx = self._sp.piece_to_id(token)
    if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx):
      return None
    return int(idx)

  def id_to_token(self, idx: int) -> str:
    if idx in self._added_by_id:
      return self._added_by_id[idx]
    return self._sp.id_to_piece(int(idx))


class HFTokenizer(Tokenizer):
  """A `tokenizers` library tokenizer from `tokenizer.json` (Llama-3 style).

  Args:
    path: the tokenizer.json file.
    bos_token, eos_token, pad_token: token strings; default from a `tokenizer_config.json`
      next to it, else the first present of `<|begin_of_text|>`/`<s>`, `<|eot_id|>`/
      `<|end_of_text|>`/`</s>`/`<|endoftext|>`, `<|reserved_special_token_0|>`/`<unk>`/`<pad>`.
  The tokenizer's defaults (`encode_default`) follow `add_bos_token` / `add_eos_token` of a
  tokenizer_config.json when it sets them (as transformers does), else the file's
  post-processor (Llama-3: BOS).
  """

  def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None):
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as _HFTok

    self.path = path
    self._tok = _HFTok.from_file(path)
    new = [t for t in (VISION_START, VISION_END) if self._tok.token_to_id(t) is None]
    if new:
      self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    # Span encoding uses a clone without post-processor: same ids when no special tokens are
    # added, and offsets a ByteLevel(trim_offsets=True) processor cannot trim, so whitespace
    # tokens keep their true start (encode_spans assigns tokens by their first character).
    self._tok_raw = _HFTok.from_str(self._tok.to_str())
    self._tok_raw.post_processor = None
    cfg_path = os.path.join(os.path.dirname(os.path.abspath(path)), "tokenizer_config.json")
    cfg = _read_json(cfg_path) if os.path.exists(cfg_path) else {}

    def pick(explicit, key, candidates):
      name = explicit or _token_content(cfg.get(key))
      if name is not None:
        idx = self._tok.token_to_id(name)
        if idx is None:
          raise ValueError(f"{path}: {key} {name!r} is not in the vocabulary")
        return idx
      for c in candidates:
        idx = self._tok.token_to_id(c)
        if idx is not None:
          return idx
      return None

    self.bos_id = pick(bos_token, "bos_token", _BOS_CANDIDATES)
    self.eos_id = pick(eos_token, "eos_token", _EOS_CANDIDATES)
    pad = pick(pad_token, "pad_token", _PAD_CANDIDATES)
    if pad is None:
      pad = self.eos_id
    if pad is None:
      raise ValueError(f"{path}: no pad token found; pass pad_token=")
    self.pad_id = pad
    self.vision_start_id = self._tok.token_to_id(VISION_START)
    self.vision_end_id = self._tok.token_to_id(VISION_END)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    # transformers rebuilds a Llama-family fast tokenizer's post-processor from the config's
    # add_bos_token / add_eos_token; honour them when present, else trust the file.
    self._cfg_specials = "add_bos_token" in cfg or "add_eos_token" in cfg
    if self._cfg_specials:
      self.add_bos_default = bool(cfg.get("add_bos_token", False)) and self.bos_id is not None
      self._add_eos_default = bool(cfg.get("add_eos_token", False)) and self.eos_id is not None
    else:
      probe = self._tok.encode("a", add_special_tokens=True).ids
      self.add_bos_default = self.bos_id is not None and bool(probe) and probe[0] == self.bos_id

  def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    enc = self._tok_raw.encode(text, add_special_tokens=False)
    return list(enc.ids), [int(s) for s, _ in enc.offsets]

  def encode_default(self, text: str) -> list[int]:
    if self._cfg_specials:
      return self.encode(text, add_bos=self.add_bos_default, add_eos=self._add_eos_default)
    check_no_placeholder(text)
    return list(self._tok.encode(text, add_special_tokens=True).ids)

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = False,
             continuation: bool = False) -> str:
    # `continuation` is accepted for interface parity and ignored: byte-level BPE (Llama-3)
    # decodes piecewise exactly; a Metaspace tokenizer.json may drop one leading space per call.
    ids = [int(i) for i in ids]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"tokenizer: id {i} is outside the vocabulary ({self.vocab_size})")
    return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def id_to_token(self, idx: int) -> str:
    return self._tok.id_to_token(int(idx))


def load_tokenizer(path: str, **kwargs: Any) -> Tokenizer:
  """Loads a tokenizer from a file or a directory.

  A directory with `tokenizer.json` uses the `tokenizers` backend; otherwise its
  `tokenizer.model` uses sentencepiece. A file is picked by its suffix (`.json` / `.model`).
  kwargs go to the backend constructor.
  """
  if os.path.isdir(path):
    for name, cls in (("tokenizer.json", HFTokenizer), ("tokenizer.model", SentencePieceTokenizer)):
      p = os.path.join(path, name)
      if os.path.exists(p):
        return cls(p, **kwargs)
    raise FileNotFoundError(
        f"{path}: no tokenizer.json or tokenizer.model in this directory; point to the LLM's "
        "tokenizer directory or file")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: tokenizer file not found")
  if path.endswith(".json"):
    return HFTokenizer(path, **kwargs)
  if path.endswith(".model"):
    return SentencePieceTokenizer(path, **kwargs)
  raise ValueError(f"{path}: unknown tokenizer file type; expected tokenizer.json or a .model")
