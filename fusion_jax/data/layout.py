"""`EncodedSample` -> fixed-shape arrays of the FUSION batch contract (models/batch_spec.py).

For one q (drawn per batch, `choose_q`) and N image tokens per image, `layout_sample` expands
the slots of one sample into an "example": every key of the contract except `images` and
`segment_ids`, without the row and sample axes (input_ids (S,), has_image (), latent_pos
(Lq*q,), question_pos (Lq,), instructs (T,), ...), its tokens first in the (S,) row.
`layout_batch` lays out one sample per row (P = 1); the packer (packing.py) puts several
examples into one row with `batch_spec.pack_examples`. `sample_length` is an example's length
without laying it out.

Slots: an image sample's first slot gets N positions (`image_start`), every other slot q latent
positions; a text-only sample's slots are all latent (docs/model.md §6).

Truncation (docs/model.md §6, the authors' `prepare_inputs_labels_for_multimodal`):
  1. max_questions: questions past `max_questions` are dropped WITH their tokens: the sequence
     is cut where user turn `max_questions` begins, so no later turn's latent slots sit in the
     sequence unrefined and no answer is trained on context the model never aligned.
  2. seq_len: positions >= seq_len are dropped. A question survives iff question_pos < seq_len
     (its latent slots precede it, so they survive too); latent_pos keeps q x (number of
     surviving questions) entries. Latent slots of a question cut by seq_len may remain in the
     sequence without a latent_pos entry: they hold pad_id and come after every surviving
     label, so they cannot influence the loss.
  3. If no supervised label survives: BadSample('no_supervised_tokens').
Positions only grow with q, so a sample that survives at the largest candidate q survives at
every smaller one: `check_sample` filters once, before q is known.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fusion_jax.data.conversation import IMAGE_SLOT, LATENT_SLOT, TEXT, EncodedSample
from fusion_jax.data.errors import BadSample
from fusion_jax.models import batch_spec
from fusion_jax.models import query_len as query_len_lib

IGNORE_INDEX = batch_spec.pad_value("labels")  # -100: not supervised

# Keys layout_sample produces (the pipeline adds "images").
LAYOUT_KEYS: tuple[str, ...] = tuple(k for k in batch_spec.EXAMPLE_KEYS if k != "images")


def _expand(enc: EncodedSample, q: int, n_img: int, max_questions: int):
  """Full (untruncated except for max_questions) arrays of one sample."""
  ids_parts: list[np.ndarray] = []
  sup_parts: list[np.ndarray] = []
  slot_parts: list[np.ndarray] = []
  latent_pos: list[list[int]] = [[] for _ in range(enc.num_questions)]
  question_pos: list[int] = []
  image_start = -1
  pos = 0
  q_end_segments = {si: l for l, si in enumerate(enc.question_ends)}
  for si, seg in enumerate(enc.segments):
    if seg.turn >= max_questions:
      break  # rule 1: drop the later questions with their tokens
    if seg.kind == TEXT:
      n = int(seg.ids.size)
      ids_parts.append(seg.ids.astype(np.int32, copy=False))
      sup_parts.append(np.full((n,), seg.supervised))
    else:
      n = n_img if seg.kind == IMAGE_SLOT else q
      ids_parts.append(np.full((n,), -1, np.int32))  # filled with pad_id by the caller
      sup_parts.append(np.zeros((n,), bool))
      if seg.kind == IMAGE_SLOT:
        if image_start >= 0:
          raise ValueError(f"{enc.source}: two image slots in one sample")
        image_start = pos
      elif seg.kind == LATENT_SLOT:
        if seg.turn < 0 or latent_pos[seg.turn]:
          raise ValueError(f"{enc.source}: latent slot outside a turn or twice in turn {seg.turn}")
        latent_pos[seg.turn] = list(range(pos, pos + n))
      else:
        raise ValueError(f"{enc.source}: unknown segment kind {seg.kind!r}")
    if si in q_end_segments:
      question_pos.append(pos + n - 1)
    pos += n
  ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0,), np.int32)
  sup = np.concatenate(sup_parts) if sup_parts else np.zeros((0,), bool)
  return ids, sup, image_start, latent_pos[:len(question_pos)], question_pos


def sample_length(enc: EncodedSample, *, q: int, num_image_tokens: int, seq_len: int,
                  max_questions: int) -> int:
  """Tokens `layout_sample` gives the sample at this q (slots included, truncated to seq_len),
  from the segment sizes alone (the packer's per-batch cost)."""
  n = 0
  for seg in enc.segments:
    if seg.turn >= max_questions:
      break  # rule 1, as _expand
    if seg.kind == TEXT:
      n += int(seg.ids.size)
    else:
      n += num_image_tokens if seg.kind == IMAGE_SLOT else q
  return min(n, seq_len)


def _check_sizes(q: int, num_image_tokens: int, seq_len: int, max_questions: int) -> None:
  query_len_lib.side(q, "layout: q")
  for name, v in (("num_image_tokens", num_image_tokens), ("seq_len", seq_len),
                  ("max_questions", max_questions)):
    if v < 1:
      raise ValueError(f"layout: {name}={v} must be >= 1")


def layout_sample(enc: EncodedSample, *, q: int, num_image_tokens: int, seq_len: int,
                  max_questions: int, max_instruct_len: int, pad_id: int,
                  require_labels: bool = True) -> dict[str, np.ndarray]:
  """One example of the batch contract (all keys but `images`), fixed shapes.

  Shapes: (S,) for the sequence keys with S = seq_len, (Lq*q,) latent_pos, (Lq,) question_pos
  with Lq = max_questions, (T,) instructs with T = max_instruct_len, () has_image/image_start.
  require_labels=False lays out inference prompts (`add_generation_prompt`), which have none.

  Raises:
    BadSample('no_supervised_tokens') when truncation leaves no supervised label.
  """
  _check_sizes(q, num_image_tokens, seq_len, max_questions)
  if max_instruct_len < 1:
    raise ValueError(f"layout: max_instruct_len={max_instruct_len} must be >= 1")
  ids, sup, image_start, latent_pos, question_pos = _expand(enc, q, num_image_tokens,
                                                            max_questions)
  n = min(ids.size, seq_len)
  ex = batch_spec.empty_example(batch_spec.Dims(
      batch_size=1, seq_len=seq_len, samples_per_row=1, max_questions=max_questions, q=q,
      instruct_len=max_instruct_len, image_size=0), pad_id, images=False)
  ex["input_ids"][:n] = np.where(ids[:n] < 0, pad_id, ids[:n])
  ex["labels"][:n] = np.where(sup[:n], ex["input_ids"][:n], IGNORE_INDEX)
  if require_labels and not (ex["labels"] != IGNORE_INDEX).any():
    raise BadSample("no_supervised_tokens",
                    f"no supervised token in the first {seq_len} positions (q={q})", enc.source)
  ex["token_mask"][:n] = True
  ex["positions"][:n] = np.arange(n, dtype=np.int32)

  # Questions are in sequence order, so the survivors are a prefix.
  for l in (l for l, p in enumerate(question_pos) if p < seq_len):
    ex["question_pos"][l] = question_pos[l]
    ex["latent_pos"][l * q:(l + 1) * q] = latent_pos[l]

  t = min(enc.instructs.size, max_instruct_len)
  ex["instructs"][:t] = enc.instructs[:t]
  ex["instructs_mask"][:t] = True
  ex["has_image"][()] = enc.has_image
  if enc.has_image and 0 <= image_start < seq_len:
    ex["image_start"][()] = image_start
  return ex


def layout_batch(encs: Sequence[EncodedSample], q: int, *, num_image_tokens: int, seq_len: int,
                 max_questions: int, max_instruct_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One sample per row (P = 1): the batch contract without `images`, rows in `encs` order.

  Raises BadSample from a sample that does not fit; filter with `check_sample` (at the
  largest q) before batching so this never happens.
  """
  if not encs:
    raise ValueError("layout_batch: empty batch")
  return batch_spec.stack_examples([
      layout_sample(e, q=q, num_image_tokens=num_image_tokens, seq_len=seq_len,
                    max_questions=max_questions, max_instruct_len=max_instruct_len,
                    pad_id=pad_id) for e in encs])


def check_sample(enc: EncodedSample, *, q_max: int, num_image_tokens: int, seq_len: int,
                 max_questions: int) -> None:
  """Raises BadSample('no_supervised_tokens') unless a label survives at q = q_max.

  Positions are non-decreasing in q, so passing at the largest candidate q means the sample
  lays out at every candidate: call this per sample before batching.
  """
  _check_sizes(q_max, num_image_tokens, seq_len, max_questions)
  ids, sup, *_ = _expand(enc, q_max, num_image_tokens, max_questions)
  if not sup[:seq_len].any():
    raise BadSample("no_supervised_tokens",
                    f"no supervised token in the first {seq_len} positions at q={q_max}",
                    enc.source)


def choose_q(seed: int, batch_index: int,
             candidates: Sequence[int] = query_len_lib.CANDIDATES) -> int:
  """The q of global batch `batch_index`: uniform over `candidates`, deterministic.

  A pure function of (seed, batch_index), so every host and every restart picks the same q
  for the same batch (the original draws `random.choice` per forward pass).
  """
  cands = [int(c) for c in candidates]
  query_len_lib.check(cands, "choose_q")
  if seed < 0 or batch_index < 0:
    raise ValueError(f"choose_q: seed ({seed}) and batch_index ({batch_index}) must be >= 0")
  rng = np.random.default_rng([seed, batch_index, 0x51A7])
  return cands[int(rng.integers(len(cands)))]


def batch_q(cfg, batch_index: int, *, train: bool) -> int:
  """The q of host batch `batch_index` under a DataConfig: drawn by `choose_q` from
  (cfg.seed, batch_index) over cfg.query_len in training, the fixed cfg.q_eval otherwise."""
  if not train:
    return cfg.q_eval
  return int(choose_q(cfg.seed, batch_index, cfg.query_len))


def largest_batch_q(cfg, *, train: bool) -> int:
  """The largest q `batch_q` gives under a DataConfig (the q `check_sample` filters at)."""
  return max(cfg.query_len) if train else cfg.q_eval
