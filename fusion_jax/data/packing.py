"""Sequence packing: several FUSION samples per row of seq_len tokens (`data.packing`).

FUSION samples vary widely in length (a caption sample is ~800 tokens of which 729 are image
tokens; conversations run to thousands), so one sample per row computes mostly on padding.
The packer fills each row with up to P = `data.max_samples_per_row` samples; the batch contract
(fusion_jax/models/batch_spec.py) keeps every sample apart: segment ids make attention
block-diagonal, positions restart per sample, and each sample keeps its own image, latents,
questions, instructions and mapping-loss terms.

Where it runs: in the main process after the worker processes (`mp_prefetch`), on the decoded,
q-independent samples that `SkipAwareBatch` ships in chunks. A sample's length depends on the
batch's q (q latent slots per question), and q is drawn per batch from (seed, batch index), so
the packer counts its own batches: batch k is packed with q = choose_q(seed, k), from lengths
computed at that q (`layout.sample_length`).

Policy (`plan_rows`): a buffer of `data.packing_buffer` samples in arrival order; each batch
places the OLDEST buffered sample first (so no sample waits more than buffer/batch batches),
then the others longest first, each into the first row with room (first-fit decreasing). What
does not fit stays for the next batch. At the end of a finite stream the rest is packed into
batches whose unused rows are all padding.

Resume is exact. The state is the parent's state before the oldest chunk that still has a
buffered sample, which samples of that chunk and the later ones have been packed already, and
the batch counter; `set_state` rereads those chunks and rebuilds the identical buffer. It is
JSON-serialisable (orbax stores it with the checkpoint).
"""
from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grain
import numpy as np

from fusion_jax.data import layout as layout_lib
from fusion_jax.data.data_config import DataConfig
from fusion_jax.models import batch_spec


def plan_rows(lengths: Sequence[int], *, num_rows: int, seq_len: int,
              samples_per_row: int) -> list[list[int]]:
  """Assigns buffered samples (in arrival order) to rows; returns each row's sample indices.

  Sample 0 (the oldest) goes first, then the rest longest first (ties in arrival order), each
  into the first row with room for its length and a free sample slot. Unplaced samples are
  simply absent from the result. Every length must be <= seq_len.
  """
  rows: list[list[int]] = [[] for _ in range(num_rows)]
  used = [0] * num_rows
  if not lengths or num_rows <= 0:
    return rows
  if max(lengths) > seq_len:
    raise ValueError(f"plan_rows: a sample of {max(lengths)} tokens exceeds seq_len={seq_len}")
  order = [0] + sorted(range(1, len(lengths)), key=lambda i: -lengths[i])
  free = seq_len  # the most room any row with a free sample slot still has
  for i in order:
    n = lengths[i]
    if n > free:
      continue
    for r in range(num_rows):
      if len(rows[r]) < samples_per_row and used[r] + n <= seq_len:
        rows[r].append(i)
        used[r] += n
        break
    open_rows = [seq_len - used[r] for r in range(num_rows) if len(rows[r]) < samples_per_row]
    free = max(open_rows) if open_rows else -1
    if free < 0:
      break
  return rows


class PackBuffer:
  """Samples waiting to be packed, in arrival order (shared by the pipeline and `simulate`)."""

  def __init__(self, num_rows: int, seq_len: int, samples_per_row: int, buffer_size: int):
    self.num_rows, self.seq_len, self.samples_per_row = num_rows, seq_len, samples_per_row
    self.buffer_size = buffer_size
    self.items: list[Any] = []

  def wants_more(self) -> bool:
    return len(self.items) < self.buffer_size

  def take(self, length_of: Callable[[Any], int]) -> list[list[Any]]:
    """Plans one batch from the buffer and removes the placed items; returns non-empty rows."""
    lengths = [length_of(x) for x in self.items]
    plan = plan_rows(lengths, num_rows=self.num_rows, seq_len=self.seq_len,
                     samples_per_row=self.samples_per_row)
    taken = {i for row in plan for i in row}
    rows = [[self.items[i] for i in row] for row in plan if row]
    self.items = [x for i, x in enumerate(self.items) if i not in taken]
    return rows


def buffer_size(cfg: DataConfig) -> int:
  """Samples the packer buffers: data.packing_buffer, default 2 x rows x samples per row."""
  return cfg.packing_buffer or 2 * cfg.batch_size * cfg.max_samples_per_row


def simulate(lengths: Iterable[int], *, batch_size: int, seq_len: int, samples_per_row: int,
             buffer: int) -> dict[str, float]:
  """Length-only run of the packer over a stream of sample lengths (each <= seq_len).

  Returns packing efficiency (real tokens / row tokens over all batches), samples per row,
  batches, and the same efficiency with one sample per row (`unpacked_efficiency`).
  """
  lengths = iter(lengths)
  buf = PackBuffer(batch_size, seq_len, samples_per_row, buffer)
  done, tokens, batches, samples, real = False, 0, 0, 0, []
  while True:
    while not done and buf.wants_more():
      try:
        buf.items.append(min(int(next(lengths)), seq_len))
      except StopIteration:
        done = True
    if not buf.items:
      break
    rows = buf.take(lambda n: n)
    batches += 1
    samples += sum(len(r) for r in rows)
    tokens += sum(sum(r) for r in rows)
    real.extend(n for r in rows for n in r)
  return {"efficiency": tokens / max(batches * batch_size * seq_len, 1),
          "samples_per_row": samples / max(batches * batch_size, 1), "batches": batches,
          "samples": samples,
          "unpacked_efficiency": float(np.mean(real)) / seq_len if real else 0.0}


# ----------------------------------------------------------------------------- grain stage


class PackBatches(grain.IterDataset):
  """Chunks of decoded samples (SkipAwareBatch output) -> packed contract batches.

  Output per batch: {"batch": contract dict (B = batch_size rows, P = max_samples_per_row) or
  None, "counts", "skips"} like LayoutBatch: counts[0] ("samples") is the number of samples
  packed into this batch; skips and fix-ups are counted in the batch during which their chunk
  was read.
  """

  def __init__(self, parent: grain.IterDataset, cfg: DataConfig, pad_id: int, train: bool,
               num_counters: int):
    super().__init__(parent)
    self._args = (cfg, pad_id, train, num_counters)
    self._cfg = cfg

  def __iter__(self):
    return _PackIterator(self._parent.__iter__(), *self._args)

  def __str__(self) -> str:
    return (f"PackBatches(rows={self._cfg.batch_size}, seq_len={self._cfg.seq_len}, "
            f"samples_per_row={self._cfg.max_samples_per_row})")


class _PackIterator(grain.DatasetIterator):

  def __init__(self, parent, cfg: DataConfig, pad_id: int, train: bool, num_counters: int):
    super().__init__(parent)
    self._cfg, self._pad_id, self._train = cfg, pad_id, train
    self._num_counters = num_counters
    self._buf = PackBuffer(cfg.batch_size, cfg.seq_len, cfg.max_samples_per_row,
                           buffer_size(cfg))
    # Chunks read whose samples are not all packed: [parent state before it, size, packed ids].
    self._live: collections.deque[list[Any]] = collections.deque()
    self._next_chunk = 0  # sequence number of the next chunk read (live[0] is _next_chunk - len)
    self._batches = 0
    self._exhausted = False
    self._counts = self._zero_counts()
    self._skips: list[Any] = []

  def _zero_counts(self) -> np.ndarray:
    return np.zeros((self._num_counters,), np.int64)

  def _read_chunk(self, replay_packed: set[int] | None = None) -> bool:
    """Reads one chunk into the buffer; False at the end of the parent stream."""
    state = self._parent.get_state()
    try:
      chunk = next(self._parent)
    except StopIteration:
      return False
    seq = self._next_chunk
    self._next_chunk += 1
    encs = chunk["encs"]
    packed = set() if replay_packed is None else set(replay_packed)
    self._live.append([state, len(encs), packed])
    for i, enc in enumerate(encs):
      if i not in packed:
        self._buf.items.append((seq, i, enc, chunk["images"][i]))
    if replay_packed is None:  # counted once, when first read
      counts = np.asarray(chunk["counts"], np.int64).copy()
      counts[0] = 0  # "samples" counts packed samples, added when they are packed
      self._counts += counts
      self._skips.extend(chunk["skips"])
    self._drop_done_chunks()
    return True

  def _drop_done_chunks(self) -> None:
    while self._live and len(self._live[0][2]) >= self._live[0][1]:
      self._live.popleft()

  def __next__(self):
    cfg = self._cfg
    while not self._exhausted and self._buf.wants_more():
      if not self._read_chunk():
        self._exhausted = True
    if not self._buf.items:
      if self._counts.any() or self._skips:
        out = {"batch": None, "counts": self._counts, "skips": self._skips}
        self._counts, self._skips = self._zero_counts(), []
        return out
      raise StopIteration
    q = layout_lib.batch_q(self._cfg, self._batches, train=self._train)
    length = lambda it: layout_lib.sample_length(  # noqa: E731
        it[2], q=q, num_image_tokens=cfg.num_image_tokens, seq_len=cfg.seq_len,
        max_questions=cfg.max_questions)
    rows = self._buf.take(length)
    first = self._next_chunk - len(self._live)
    examples = []
    for row in rows:
      exs = []
      for seq, i, enc, images in row:
        ex = layout_lib.layout_sample(
            enc, q=q, num_image_tokens=cfg.num_image_tokens, seq_len=cfg.seq_len,
            max_questions=cfg.max_questions, max_instruct_len=cfg.max_instruct_len,
            pad_id=self._pad_id)
        ex["images"] = images
        exs.append(ex)
        self._live[seq - first][2].add(i)
      examples.append(exs)
    self._drop_done_chunks()
    batch = batch_spec.pack_examples(examples, seq_len=cfg.seq_len,
                                     samples_per_row=cfg.max_samples_per_row,
                                     pad_id=self._pad_id, num_rows=cfg.batch_size)
    self._batches += 1
    counts = self._counts
    counts[0] += sum(len(r) for r in rows)
    out = {"batch": batch, "counts": counts, "skips": self._skips}
    self._counts, self._skips = self._zero_counts(), []
    return out

  def get_state(self) -> dict[str, Any]:
    parent = self._live[0][0] if self._live else self._parent.get_state()
    return {"parent": parent, "packed": [sorted(c[2]) for c in self._live],
            "batches": self._batches, "exhausted": self._exhausted and not self._live}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._buf.items = []
    self._live.clear()
    self._next_chunk = 0
    self._batches = int(state["batches"])
    self._counts, self._skips = self._zero_counts(), []
    self._exhausted = bool(state.get("exhausted", False))
    for packed in state["packed"]:
      if not self._read_chunk(set(int(i) for i in packed)):
        raise ValueError("packing state: the data ended before the saved buffer was rebuilt; "
                         "resume with the same data and data config")

  def __str__(self) -> str:
    return "PackIterator"
