"""LLaVA-format conversations -> token segments with labels by construction (docs/model.md §6, §9).

A record is `{"id", "image" (optional relative path), "conversations": [{"from": "human" |
"gpt", "value": str}, ...]}`. `encode_conversation` turns it into an `EncodedSample`: a list of
segments in sequence order, each either text (token ids + a `supervised` flag) or a slot
(`image_slot`: N image tokens, `latent_slot`: q latent tokens). Nothing here depends on q or N,
so the result can be cached; `fusion_jax/data/layout.py` expands it for a given q.

Templates (docs/model.md §9; `<vs>` = `<vision_start>`, `<ve>` = `<vision_end>`):

  phi_3:    [BOS?] `<|system|>\\nYou are a helpful AI assistant.<|end|>`
            per turn `\\n<|user|>\\n<vs><latent_image><ve>` message `<|end|>`
                     `\\n<|assistant|>\\n` answer `<|end|>`
  llama_3:  BOS `<|start_header_id|>system<|end_header_id|>\\n\\n` SYSTEM `<|eot_id|>`
            per turn `<|start_header_id|>user<|end_header_id|>\\n\\n<vs><latent_image><ve>` message
                     `<|eot_id|>`
                     `<|start_header_id|>assistant<|end_header_id|>\\n\\n` answer `<|eot_id|>`

BOS: the sequence starts with BOS iff the tokenizer's defaults add one (the authors tokenize
the prompt with `tokenizer(...)`, keeping the first chunk's BOS): Llama-3 yes, Phi-3.5 per its
`add_bos_token`.

Llama-3 system text: the authors' `conversation.py` is not in any source we could search
(their repository index lacks it; Cambrian's and LLaVA-NeXT's templates differ). Only its
opening is known, "You are a helpful, highly intelligent language and vision assistant.
...". `LLAMA3_SYSTEM` completes it with LLaVA-NeXT's llama-3 wording ("You are able to
understand the visual content that the user provides, and assist the user with a variety of
tasks using natural language."). This is a RECONSTRUCTION: pass `system=` (or set the config's
template system text) to the exact string when it is known; it only changes the unsupervised
system prompt tokens.

Image marker (docs/model.md §6): in an image sample the `<image>` marker is removed from the human
text (wherever it was; the message is then stripped like the authors' `.replace('<image>','')
.strip()`) and `<vs><image><ve>\\n` is put at the start of the FIRST user message (no `\\n`
when the message is empty, as `'<image>\\n'.strip()` in the original). Textually the first
turn then reads `<vs><latent_image><ve><vs><image><ve>\\n question`. The authors' model gives
the N image tokens to the FIRST placeholder of the sequence and q latents to every other one,
so the effective first turn is `<vs>[N image tokens]<ve><vs>[q latents]<ve>\\n question`.
`EncodedSample.segments` holds that effective order: the first slot of an image sample is the
`image_slot`, the turn's `latent_slot` follows. Text-only samples: every slot is a latent slot.

Labels: each text piece is tokenized as part of the whole chunk between slots (one tokenizer
call per chunk, the ids the authors' `tokenizer_image_token` gives) and split back per piece
(`Tokenizer.encode_spans`), so supervision is exact: assistant answers and their end token are
supervised; BOS, system, user turns and the assistant header are not. Question l ends at the
last token of the assistant header of turn l (docs/model.md §6; the authors' INSTRUCT_INDEX).

Record fix-ups (counted by the pipeline, never skips): a leading gpt turn is dropped
(`starts_with_gpt`, as the authors do); a trailing human turn without answer is dropped
(`trailing_human`); an image record without `<image>` gets the marker implied
(`image_without_marker`); a marker in a later turn moves to the first (`image_marker_moved`).
Everything else that is wrong raises `BadSample` (see errors.py for the reasons).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from fusion_jax.data.errors import BadSample
from fusion_jax.data.tokenizer import (
    IMAGE_MARKER, LATENT_MARKER, VISION_END, VISION_START, Tokenizer)

PHI3_SYSTEM = "You are a helpful AI assistant."
LLAMA3_SYSTEM = (
    "You are a helpful, highly intelligent language and vision assistant. "
    "You are able to understand the visual content that the user provides, "
    "and assist the user with a variety of tasks using natural language.")

TEXT, IMAGE_SLOT, LATENT_SLOT = "text", "image_slot", "latent_slot"
_USER_ROLES = ("human", "user")
_ASSISTANT_ROLES = ("gpt", "assistant")
_RESERVED_IN_TEXT = (LATENT_MARKER, VISION_START, VISION_END)


@dataclasses.dataclass(frozen=True)
class Template:
  """A chat template. `system_block` already contains the system text."""
  name: str
  system_block: str
  user_header: str
  user_end: str
  assistant_header: str
  assistant_end: str

  @property
  def stop_strings(self) -> tuple[str, ...]:
    """End-of-answer token strings (generation stops there)."""
    return (self.assistant_end,)


def get_template(name: str, system: str | None = None) -> Template:
  """The template `name` ('phi_3' | 'llama_3'), optionally with another system text."""
  if name == "phi_3":
    sys_text = PHI3_SYSTEM if system is None else system
    return Template(name, f"<|system|>\n{sys_text}<|end|>", "\n<|user|>\n", "<|end|>",
                    "\n<|assistant|>\n", "<|end|>")
  if name == "llama_3":
    sys_text = LLAMA3_SYSTEM if system is None else system
    return Template(
        name, f"<|start_header_id|>system<|end_header_id|>\n\n{sys_text}<|eot_id|>",
        "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>")
  raise BadSample("unknown_template", f"template {name!r}; use 'phi_3' or 'llama_3'")


@dataclasses.dataclass
class Segment:
  """One run of the sequence.

  kind: 'text' (ids are token ids), 'image_slot' (N positions) or 'latent_slot' (q positions);
  ids: int32 token ids, empty for slots; supervised: labels = ids for this run;
  turn: the user turn (question index) this run belongs to, -1 before the first turn.
  """
  kind: str
  ids: np.ndarray
  supervised: bool = False
  turn: int = -1


@dataclasses.dataclass
class EncodedSample:
  """A conversation tokenized independently of q and N.

  segments: sequence-order runs (see `Segment`).
  question_ends: per user turn l, the index into `segments` of the text segment whose LAST
    token is question l's position (the assistant header of turn l).
  instructs: (T,) int32, all user messages (markers stripped, each `.strip()`ed) concatenated
    and tokenized with the tokenizer's defaults (Llama-3 adds BOS); EMPTY for text-only
    samples (the authors use [0] with 0 = invalid, i.e. no instruction tokens; docs/model.md §4).
  has_image: the record names an image; image: its relative path or None; id: record id;
  source: file:line or record id for messages; fixups: fix-up keys applied (errors.FIXUPS).
  """
  segments: list[Segment]
  question_ends: list[int]
  instructs: np.ndarray
  has_image: bool
  image: str | None
  id: str
  source: str = ""
  fixups: tuple[str, ...] = ()

  @property
  def num_questions(self) -> int:
    return len(self.question_ends)

  def text_length(self) -> int:
    """Number of text tokens (slots excluded)."""
    return int(sum(s.ids.size for s in self.segments))

  def length(self, q: int, num_image_tokens: int) -> int:
    """Sequence length once slots are expanded for q latents and N image tokens."""
    n = 0
    for s in self.segments:
      n += s.ids.size if s.kind == TEXT else (num_image_tokens if s.kind == IMAGE_SLOT else q)
    return n


def _normalize_turns(record: Mapping[str, Any], source: str,
                     allow_open_end: bool) -> tuple[list[tuple[str, str]], list[str]]:
  """(role, text) turns alternating user/assistant, and the fix-ups applied."""
  conv = record.get("conversations") if isinstance(record, Mapping) else None
  if not isinstance(conv, list) or not conv:
    raise BadSample("bad_record", "'conversations' missing, empty or not a list", source)
  turns: list[tuple[str, str]] = []
  for k, t in enumerate(conv):
    if not isinstance(t, Mapping) or "from" not in t or "value" not in t:
      raise BadSample("bad_record", f"turn {k} is not a {{from, value}} object", source)
    role, value = str(t["from"]).lower(), t["value"]
    if not isinstance(value, str):
      raise BadSample("bad_record", f"turn {k} value is {type(value).__name__}, not str", source)
    if role in _USER_ROLES:
      turns.append(("user", value))
    elif role in _ASSISTANT_ROLES:
      turns.append(("assistant", value))
    else:
      raise BadSample("unknown_role", f"turn {k} from {t['from']!r}", source)
  fixups: list[str] = []
  first = 0
  if turns[0][0] == "assistant":
    turns = turns[1:]
    first = 1
    fixups.append("starts_with_gpt")
  # Alternation is checked before a trailing human turn is dropped: [human, human] is a role
  # error, not a one-turn record that then has nothing to supervise.
  for k, (role, _) in enumerate(turns):
    if role != ("user" if k % 2 == 0 else "assistant"):
      # Only a repeated role breaks the alternation (k = 0 can only follow a dropped gpt turn).
      raise BadSample("non_alternating_roles",
                      f"turns {k + first - 1} and {k + first} are both "
                      f"{'human' if role == 'user' else 'gpt'}", source)
  if turns and turns[-1][0] == "user" and not allow_open_end:
    turns = turns[:-1]
    fixups.append("trailing_human")
  if allow_open_end:
    if not turns or turns[-1][0] != "user":
      raise BadSample("bad_record", "a generation prompt must end with a human turn", source)
  elif not turns:
    raise BadSample("no_answer_turn", "no gpt turn to supervise", source)
  return turns, fixups


def encode_conversation(record: Mapping[str, Any], tokenizer: Tokenizer, template: str, *,
                        source: str = "", system: str | None = None,
                        add_generation_prompt: bool = False) -> EncodedSample:
  """Tokenizes one LLaVA record into q-independent segments (see the module docstring).

  Args:
    record: {"id", "image"?, "conversations": [{"from", "value"}, ...]}.
    tokenizer: a `fusion_jax.data.tokenizer.Tokenizer`.
    template: 'phi_3' or 'llama_3'.
    source: where the record came from (file:line), for BadSample messages.
    system: replaces the template's system text.
    add_generation_prompt: inference: the record ends with a human turn; its assistant header
      closes the sequence (that header's last token is the last question position) and no
      label is required.

  Returns:
    EncodedSample.

  Raises:
    BadSample: bad_record, unknown_role, non_alternating_roles, no_answer_turn, empty_text,
      too_many_image_markers, image_marker_without_image, reserved_marker_in_text,
      unknown_template.
  """
  tpl = get_template(template, system)
  rid = str(record.get("id", "")) if isinstance(record, Mapping) else ""
  source = source or rid
  turns, fixups = _normalize_turns(record, source, add_generation_prompt)
  image = record.get("image")
  has_image = bool(image)
  if has_image and not isinstance(image, str):
    raise BadSample("bad_record", f"'image' is {type(image).__name__}, expected a path", source)

  # --- the image marker ---
  n_markers = 0
  first_marker_turn = -1
  for k, (role, text) in enumerate(turns):
    for r in _RESERVED_IN_TEXT:
      if r in text:
        raise BadSample("reserved_marker_in_text", f"turn {k} contains {r!r}", source)
    c = text.count(IMAGE_MARKER)
    if c and role == "assistant":
      raise BadSample("reserved_marker_in_text", f"gpt turn {k} contains {IMAGE_MARKER!r}",
                      source)
    if c and first_marker_turn < 0:
      first_marker_turn = k
    n_markers += c
  if n_markers > 1:
    raise BadSample("too_many_image_markers", f"{n_markers} {IMAGE_MARKER} markers", source)
  if n_markers and not has_image:
    raise BadSample("image_marker_without_image", "text has <image> but record has no image",
                    source)
  if has_image and not n_markers:
    fixups.append("image_without_marker")
  elif first_marker_turn > 0:
    fixups.append("image_marker_moved")

  messages: list[str] = []
  for k, (role, text) in enumerate(turns):
    if role == "user" and IMAGE_MARKER in text:
      text = text.replace(IMAGE_MARKER, "").strip()
    elif role == "user" and k == 0 and has_image:
      text = text.strip()  # the authors strip the message that carried the marker
    if not text.strip() and not (role == "user" and k == 0 and has_image):
      raise BadSample("empty_text", f"turn {k} ({role}) is empty", source)
    messages.append(text)

  # --- pieces in sequence order: (kind, text, supervised, turn) ---
  pieces: list[tuple[str, str, bool, int]] = [(TEXT, tpl.system_block, False, -1)]
  question_piece: list[int] = []
  for k in range(0, len(turns), 2):
    turn = k // 2
    pieces.append((TEXT, tpl.user_header + VISION_START, False, turn))
    if k == 0 and has_image:
      # Effective order: the first placeholder takes the image (see module docstring).
      pieces.append((IMAGE_SLOT, "", False, turn))
      pieces.append((TEXT, VISION_END + VISION_START, False, turn))
      pieces.append((LATENT_SLOT, "", False, turn))
      sep = "\n" if messages[0] else ""
      pieces.append((TEXT, VISION_END + sep + messages[0] + tpl.user_end, False, turn))
    else:
      pieces.append((LATENT_SLOT, "", False, turn))
      pieces.append((TEXT, VISION_END + messages[k] + tpl.user_end, False, turn))
    question_piece.append(len(pieces))
    pieces.append((TEXT, tpl.assistant_header, False, turn))
    if k + 1 < len(turns):
      pieces.append((TEXT, messages[k + 1] + tpl.assistant_end, True, turn))

  # --- tokenize chunk by chunk (a chunk = text between slots), split back per piece ---
  segments: list[Segment] = []
  piece_to_segment: dict[int, int] = {}
  if tokenizer.add_bos_default:
    segments.append(Segment(TEXT, np.asarray([tokenizer.bos_id], np.int32), False, -1))
  start = 0
  while start < len(pieces):
    if pieces[start][0] != TEXT:
      segments.append(Segment(pieces[start][0], np.zeros((0,), np.int32), False, pieces[start][3]))
      start += 1
      continue
    end = start
    while end < len(pieces) and pieces[end][0] == TEXT:
      end += 1
    ids = tokenizer.encode_spans([p[1] for p in pieces[start:end]])
    for j in range(start, end):
      piece_to_segment[j] = len(segments)
      segments.append(Segment(TEXT, ids[j - start], pieces[j][2], pieces[j][3]))
    start = end
  question_ends = [piece_to_segment[p] for p in question_piece]
  for qi, si in enumerate(question_ends):
    if segments[si].ids.size == 0:
      raise ValueError(f"template {template}: assistant header of turn {qi} tokenized to nothing")
  # Drop empty text segments (e.g. a piece whose only token was merged into its neighbour).
  keep = [i for i, s in enumerate(segments) if s.kind != TEXT or s.ids.size]
  remap = {old: new for new, old in enumerate(keep)}
  segments = [segments[i] for i in keep]
  question_ends = [remap[i] for i in question_ends]
  if not add_generation_prompt and not any(s.supervised and s.ids.size for s in segments):
    raise BadSample("no_supervised_tokens", "answers tokenized to nothing", source)

  if has_image:
    instruct = "".join(m.strip() for m, (role, _) in zip(messages, turns) if role == "user")
    instructs = np.asarray(tokenizer.encode_default(instruct), np.int32)
  else:
    instructs = np.zeros((0,), np.int32)
  return EncodedSample(segments=segments, question_ends=question_ends, instructs=instructs,
                       has_image=has_image, image=image if has_image else None, id=rid,
                       source=source, fixups=tuple(fixups))
