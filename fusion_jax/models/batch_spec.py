"""The FUSION batch contract: every key, its shape, dtype, padding value and meaning, in one place.

A batch holds B rows of S tokens; each row holds up to P samples ("packing"; P = 1 is one
sample per row, the unpacked form used by evaluation and inference). Dimensions: B rows, S
sequence, P samples per row, Lq max questions per sample, q latents per question, T instruction
tokens, H = W = tower image size, N image tokens.

| key            | shape              | dtype | pad    | meaning                                   |
|----------------|--------------------|-------|--------|-------------------------------------------|
| input_ids      | (B, S)             | int32 | pad_id | token ids; image/latent slots and padding |
|                |                    |       |        | hold pad_id                               |
| token_mask     | (B, S)             | bool  | False  | True at real tokens (slots included); ==  |
|                |                    |       |        | (segment_ids > 0)                         |
| segment_ids    | (B, S)             | int32 | 0      | p + 1 on the tokens of the row's sample   |
|                |                    |       |        | p, 0 at padding; attention is causal      |
|                |                    |       |        | within a segment                          |
| positions      | (B, S)             | int32 | 0      | 0..n-1 over each sample's tokens (restart |
|                |                    |       |        | per sample)                               |
| labels         | (B, S)             | int32 | -100   | unshifted targets; -100 = not supervised  |
| images         | (B, P, 5, H, W, 3) | uint8 | 0      | static_hd crops [TL, TR, BL, BR, full] of |
|                |                    |       |        | sample p; zeros for text-only / empty     |
|                |                    |       |        | slots                                     |
| has_image      | (B, P)             | bool  | False  | sample p has an image                     |
| image_start    | (B, P)             | int32 | -1     | row index of sample p's first of N image  |
|                |                    |       |        | slots                                     |
| latent_pos     | (B, P, Lq*q)       | int32 | -1     | row index of latent slot v = l*q + kk of  |
|                |                    |       |        | sample p's question l                     |
| question_pos   | (B, P, Lq)         | int32 | -1     | row index of the last token of sample p's |
|                |                    |       |        | user turn l (assistant header included)   |
| instructs      | (B, P, T)          | int32 | 0      | sample p's user turns' token ids, no      |
|                |                    |       |        | markers                                   |
| instructs_mask | (B, P, T)          | bool  | False  | valid instruction tokens (explicit: id 0  |
|                |                    |       |        | is real in Llama-3)                       |

Invariants (`check_batch`): a row's samples are contiguous runs in slot order 0, 1, ...
(segment p + 1 follows segment p, padding after the last), so slot p holds a sample iff
p < max(segment_ids of the row) (`sample_mask`); every index key points inside its own
segment. q = latent_pos.shape[2] // Lq: each distinct q is one compilation, nothing else
varies. Images are normalised on device, so host-to-device is uint8.

A sample laid out alone (`fusion_jax.data.layout.layout_sample`: the same keys without the B
and P axes and without segment_ids, tokens at the start of an (S,) row) is an "example";
`pack_examples` places examples into rows. The unpacked batch of some examples and a packed
batch of the same examples have the same loss (same supervised tokens, instruction tokens and
samples; tests/test_packing.py).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class Key:
  """One batch key: symbolic shape, dtype, padding value (None = the tokenizer's pad id) and the
  logical axes the trainer shards it with."""
  name: str
  shape: tuple[str, ...]
  dtype: str
  pad: Any
  axes: tuple[str | None, ...]


_SEQ = ("batch", "length")
KEYS: tuple[Key, ...] = (
    Key("input_ids", ("B", "S"), "int32", None, _SEQ),
    Key("token_mask", ("B", "S"), "bool", False, _SEQ),
    Key("segment_ids", ("B", "S"), "int32", 0, _SEQ),
    Key("positions", ("B", "S"), "int32", 0, _SEQ),
    Key("labels", ("B", "S"), "int32", -100, _SEQ),
    Key("images", ("B", "P", "5", "H", "W", "3"), "uint8", 0, ("batch",) + (None,) * 5),
    Key("has_image", ("B", "P"), "bool", False, ("batch", None)),
    Key("image_start", ("B", "P"), "int32", -1, ("batch", None)),
    Key("latent_pos", ("B", "P", "Lq*q"), "int32", -1, ("batch", None, None)),
    Key("question_pos", ("B", "P", "Lq"), "int32", -1, ("batch", None, None)),
    Key("instructs", ("B", "P", "T"), "int32", 0, ("batch", None, None)),
    Key("instructs_mask", ("B", "P", "T"), "bool", False, ("batch", None, None)),
)
SPEC: dict[str, Key] = {k.name: k for k in KEYS}
BATCH_KEYS: tuple[str, ...] = tuple(SPEC)
# Keys of one example (a sample laid out alone): the batch keys minus segment_ids, which only
# packing assigns; "images" is optional in an example.
EXAMPLE_KEYS: tuple[str, ...] = tuple(k for k in BATCH_KEYS if k != "segment_ids")
_ROW_INDEX_KEYS = ("image_start", "latent_pos", "question_pos")  # shifted by the row offset


@dataclasses.dataclass(frozen=True)
class Dims:
  """The sizes that fix a batch's shapes."""
  batch_size: int
  seq_len: int
  samples_per_row: int
  max_questions: int
  q: int
  instruct_len: int
  image_size: int

  def shape(self, key: str) -> tuple[int, ...]:
    sizes = {"B": self.batch_size, "S": self.seq_len, "P": self.samples_per_row,
             "Lq": self.max_questions, "Lq*q": self.max_questions * self.q,
             "T": self.instruct_len, "H": self.image_size, "W": self.image_size, "5": 5, "3": 3}
    return tuple(sizes[s] for s in SPEC[key].shape)


def logical_axes() -> dict[str, tuple[str | None, ...]]:
  """{key: logical axes} for the trainer's batch shardings (leading axis = rows)."""
  return {k.name: k.axes for k in KEYS}


def pad_value(key: str, pad_id: int = 0) -> Any:
  v = SPEC[key].pad
  return pad_id if v is None else v


def zeros(dims: Dims, pad_id: int = 0) -> dict[str, np.ndarray]:
  """An all-padding batch (no sample anywhere) of `dims`."""
  return {k: np.full(dims.shape(k), pad_value(k, pad_id), SPEC[k].dtype) for k in BATCH_KEYS}


def empty_example(dims: Dims, pad_id: int = 0, *, images: bool = True) -> dict[str, np.ndarray]:
  """An all-padding example of `dims` (EXAMPLE_KEYS without the B and P axes: (S,) sequences,
  () has_image / image_start, ...) to fill in; "images" only with images=True."""
  out = {}
  for k in EXAMPLE_KEYS:
    if k == "images" and not images:
      continue
    shape = tuple(n for s, n in zip(SPEC[k].shape, dims.shape(k)) if s not in ("B", "P"))
    out[k] = np.full(shape, pad_value(k, pad_id), SPEC[k].dtype)
  return out


def abstract(dims: Dims) -> dict[str, Any]:
  """ShapeDtypeStructs of a batch of `dims` (init / eval_shape / AOT lowering)."""
  import jax  # only here: the rest of the module is host-side numpy
  return {k: jax.ShapeDtypeStruct(dims.shape(k), np.dtype(SPEC[k].dtype)) for k in BATCH_KEYS}


def dims_of(batch: Mapping[str, Any]) -> Dims:
  """The Dims a batch was built with (read off its shapes)."""
  b, s = batch["input_ids"].shape
  _, p, lq = batch["question_pos"].shape
  return Dims(batch_size=b, seq_len=s, samples_per_row=p, max_questions=lq,
              q=batch["latent_pos"].shape[2] // max(lq, 1),
              instruct_len=batch["instructs"].shape[2], image_size=batch["images"].shape[3])


def sample_mask(segment_ids: Any, samples_per_row: int) -> Any:
  """(B, S) segment ids -> (B, P) bool: slot p holds a sample (numpy or jax arrays)."""
  xp = np if isinstance(segment_ids, np.ndarray) else _jnp()
  last = xp.max(segment_ids, axis=1)  # samples fill slots 0..n-1, so n = the last segment id
  return xp.arange(samples_per_row)[None, :] < last[:, None]


def _jnp():
  import jax.numpy as jnp
  return jnp


def check_batch(batch: Mapping[str, Any], where: str = "batch") -> Dims:
  """Raises ValueError (one line naming the key and the fix) unless `batch` follows the contract.

  Shapes and dtypes always; with NumPy values also the invariants of the module docstring.
  Returns the batch's Dims.
  """
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise ValueError(f"{where}: missing keys {missing}; a FUSION batch has {list(BATCH_KEYS)} "
                     "(fusion_jax/models/batch_spec.py)")
  try:
    dims = dims_of(batch)
  except (ValueError, AttributeError) as e:
    raise ValueError(f"{where}: cannot read the batch dimensions ({e}); see "
                     "fusion_jax/models/batch_spec.py for the shapes") from None
  for k in BATCH_KEYS:
    want, got = dims.shape(k), tuple(batch[k].shape)
    if got != want:
      raise ValueError(f"{where}: {k} has shape {got}, expected {want} "
                       f"{SPEC[k].shape} (fusion_jax/models/batch_spec.py)")
    if np.dtype(batch[k].dtype) != np.dtype(SPEC[k].dtype):
      raise ValueError(f"{where}: {k} has dtype {batch[k].dtype}, expected {SPEC[k].dtype}")
  if not all(isinstance(batch[k], np.ndarray) for k in BATCH_KEYS):
    return dims
  seg, p = batch["segment_ids"], dims.samples_per_row
  if (seg < 0).any() or (seg > p).any():
    raise ValueError(f"{where}: segment_ids outside 0..P={p}")
  if not np.array_equal(batch["token_mask"], seg > 0):
    raise ValueError(f"{where}: token_mask differs from segment_ids > 0")
  for r in range(dims.batch_size):
    row = seg[r]
    n = int((row > 0).sum())
    if (row[n:] != 0).any() or (n and (np.diff(row[:n]) < 0).any()) or (
        n and set(np.unique(row[:n]).tolist()) != set(range(1, int(row.max()) + 1))):
      raise ValueError(f"{where}: row {r}: segments must be contiguous runs 1, 2, ... from the "
                       "row start with padding after them (use batch_spec.pack_examples)")
    for sp in range(p):
      idx = np.concatenate([batch["image_start"][r, sp:sp + 1], batch["latent_pos"][r, sp],
                            batch["question_pos"][r, sp]])
      idx = idx[idx >= 0]
      if idx.size and ((idx >= dims.seq_len).any() or (row[idx] != sp + 1).any()):
        raise ValueError(f"{where}: row {r} sample {sp}: an image/latent/question index lies "
                         "outside the sample's own segment")
  return dims


def example_length(ex: Mapping[str, np.ndarray]) -> int:
  """Tokens an example occupies (its real tokens are the first n of its row)."""
  return int(np.asarray(ex["token_mask"]).sum())


def stack_examples(examples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """One example per row (P = 1): the examples' arrays stacked as they are, segment 1 on their
  real tokens. Keys outside the contract (e.g. bookkeeping ids) are left out; "images" is
  included when the examples carry it (evaluation and inference prompt batches)."""
  if not examples:
    raise ValueError("stack_examples: no example")
  out = {}
  for k in EXAMPLE_KEYS:
    if k not in examples[0]:
      continue
    x = np.stack([np.asarray(ex[k]) for ex in examples]).astype(SPEC[k].dtype, copy=False)
    out[k] = x[:, None] if "P" in SPEC[k].shape else x
  out["segment_ids"] = out["token_mask"].astype(np.int32)
  return out


def pack_examples(rows: Sequence[Sequence[Mapping[str, np.ndarray]]], *, seq_len: int,
                  samples_per_row: int, pad_id: int, num_rows: int | None = None
                  ) -> dict[str, np.ndarray]:
  """Places examples into rows: row b holds rows[b][0], rows[b][1], ... back to back.

  Args:
    rows: per row, its examples (dicts of EXAMPLE_KEYS, (S',) sequences with the real tokens
      first, S' >= the example's length; "images" (5, H, W, 3) optional but all-or-none).
    seq_len: S of the batch; a row's examples must fit (sum of lengths <= S).
    samples_per_row: P (>= the longest row).
    pad_id: input_ids padding.
    num_rows: B; rows past len(rows) are all padding (default len(rows)).

  Returns:
    the batch (every key of the contract; "images" only if the examples carry images).
    Positions keep each example's own 0..n-1; row indices are shifted by the example's offset.
  """
  b = len(rows) if num_rows is None else int(num_rows)
  if b < len(rows):
    raise ValueError(f"pack_examples: {len(rows)} rows for num_rows={b}")
  first = next((ex for row in rows for ex in row), None)
  if first is None:
    raise ValueError("pack_examples: no example to pack")
  lq = first["question_pos"].shape[0]
  with_images = "images" in first
  dims = Dims(batch_size=b, seq_len=seq_len, samples_per_row=samples_per_row, max_questions=lq,
              q=first["latent_pos"].shape[0] // max(lq, 1),
              instruct_len=first["instructs"].shape[0],
              image_size=first["images"].shape[1] if with_images else 1)
  out = zeros(dims, pad_id)
  if not with_images:
    del out["images"]
  for r, row in enumerate(rows):
    if len(row) > samples_per_row:
      raise ValueError(f"pack_examples: row {r} holds {len(row)} examples, more than "
                       f"samples_per_row={samples_per_row}")
    off = 0
    for p, ex in enumerate(row):
      n = example_length(ex)
      if not np.asarray(ex["token_mask"])[:n].all():
        raise ValueError(f"pack_examples: row {r} example {p}: its real tokens must come first")
      if off + n > seq_len:
        raise ValueError(f"pack_examples: row {r} needs {off + n} tokens, more than "
                         f"seq_len={seq_len}")
      if ("images" in ex) != with_images:
        raise ValueError("pack_examples: give images for every example or for none")
      sl = slice(off, off + n)
      for k in ("input_ids", "token_mask", "positions", "labels"):
        out[k][r, sl] = ex[k][:n]
      out["segment_ids"][r, sl] = p + 1
      for k in _ROW_INDEX_KEYS:
        v = np.asarray(ex[k])
        out[k][r, p] = np.where(v >= 0, v + off, -1)
      out["has_image"][r, p] = ex["has_image"]
      out["instructs"][r, p] = ex["instructs"]
      out["instructs_mask"][r, p] = ex["instructs_mask"]
      if with_images:
        out["images"][r, p] = ex["images"]
      off += n
  return out
