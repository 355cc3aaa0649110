"""The grain input pipeline: record sources -> fixed-shape FUSION host batches (NumPy).

Stages (W = grain worker processes; everything above `mp_prefetch` runs inside each worker):

    MapDataset.source(records)              every host builds the same global record list
      .shuffle(seed)                        global, seeded, reshuffled every epoch
      [process_index::process_count]        host shard: disjoint, union = all records
      .repeat(num_epochs)                   None = forever (training)
      .map(DecodeSample)                    parse, tokenize, check, decode + static_hd the image
      .to_iter_dataset(ReadOptions)         read threads (PIL releases the GIL)
    SkipAwareBatch(batch_size)              drops skips BEFORE batching -> full batches,
                                            carries per-reason skip counts in every batch
      .mp_prefetch(W workers)
      .map_with_index(LayoutBatch)          main process: q = choose_q(seed, batch index),
                                            fixed-shape layout (fusion_jax.data.layout)
      or PackBatches (data.packing)         main process: several samples per row, its own
                                            batch counter for q (fusion_jax.data.packing)
    ThreadPrefetch(prefetch)                overlaps layout with the training step
    DataIterator                            sums counters, get_state()/set_state()

Why it is built this way:
  * q per batch. q fixes the batch's shapes, so it must be the same on every host for the same
    step and must come back identically after a restart. It is drawn from (seed, batch index)
    where the batch index is the counter of `map_with_index` in the MAIN process after
    `mp_prefetch`: it counts this host's batches in order, is saved in the grain state, and is
    independent of the number of workers. The per-sample work in the workers is therefore
    q-independent; the layout (cheap integer work) happens after the q is known.
  * Full batches. A sample that cannot be used is dropped before batching. The only
    q-dependent reason, "no supervised token left after truncation", is checked in the worker
    with the LARGEST q the batch can get (max of the candidates; eval_q in evaluation): the
    position of every token only grows with q, so a sample that keeps a supervised token at
    the largest q keeps it at every q. (A sample that would only survive with a small q is
    skipped; with realistic seq_len this needs a first question longer than the whole budget.)
  * Counters with worker processes. Counts made inside a worker are invisible to the main
    process, so each batch carries the per-reason counts of the samples skipped (and fixed up)
    while it was assembled, as a small int64 vector, plus (reason, source, message) for the
    first few. The main process adds them up as it hands batches out, so `counters` always
    describe exactly the batches consumed so far, and they are part of the saved state: a
    resumed run continues the same totals (worker read-ahead is never counted twice).
  * Resume. `get_state()` is grain's iterator state (shard position, epoch, per-worker
    positions, batch counter) plus the counters; it is JSON-serialisable for orbax.
    `set_state()` on a fresh pipeline built with the same config continues with the identical
    next batch. The state is valid for the same config, worker_count and process layout.
  * Bad input never stops training (docs/model.md §12: no bare excepts; only `BadSample` is caught).
    `strict=True` re-raises it instead, for data debugging.

`DataConfig` (data_config.py) documents every field. Multi-host: each host calls
`make_pipeline` with its own process index; the trainer assembles the host batches into
global arrays (fusion_jax.train.loop). With a finite `num_epochs`, hosts can run dry a step
apart (shards differ by up to one record and skips differ per shard): bound training by a step
count (the default, num_epochs=None, never runs dry). Training counts the samples of a short final batch as
`dropped_remainder` (or trains it padded with empty rows: data.pad_final_batch); evaluation
pads it (see `make_pipeline`).
"""
from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from absl import logging
import grain
import jax
import numpy as np

from fusion_jax.data import conversation as conversation_lib
from fusion_jax.data import images as images_lib
from fusion_jax.data import layout as layout_lib
from fusion_jax.data import mixture as mixture_lib
from fusion_jax.data import packing as packing_lib
from fusion_jax.data import sources as sources_lib
from fusion_jax.data.data_config import DataConfig, as_data_config
from fusion_jax.data.errors import FIXUPS, REASONS, BadSample
from fusion_jax.models import batch_spec

# Counter layout of the per-batch count vector (also the keys of `DataIterator.counters`):
# samples = good samples batched, then one entry per skip reason, per fix-up, and "other" for a
# BadSample reason not listed in errors.REASONS.
# dropped_remainder = good samples of a short final training batch that was not trained
# (pad_final_batch off): counted so that no record is lost silently.
COUNTER_KEYS: tuple[str, ...] = (
    ("samples",) + tuple(k for k, _ in REASONS) + tuple(k for k, _ in FIXUPS)
    + ("other", "dropped_remainder"))
_COUNTER_INDEX = {k: i for i, k in enumerate(COUNTER_KEYS)}
_MAX_SKIP_LOGS_PER_BATCH = 16


def build_source(cfg: DataConfig):
  """The global random-access source named by the config (identical on every host)."""
  if cfg.mixture:
    return mixture_lib.load_mixture(cfg.mixture, seed=cfg.seed, image_root=cfg.image_root)
  if cfg.paths:
    return mixture_lib.source_from_paths(cfg.paths, cfg.image_root)
  if cfg.tfds_name:
    from fusion_jax.data import synth_tfds  # pylint: disable=g-import-not-at-top (imports tfds)
    return synth_tfds.TfdsSource(cfg.tfds_name, cfg.tfds_data_dir, cfg.tfds_split)
  raise ValueError("data config: no data; set one of paths, mixture or tfds_name")


# ----------------------------------------------------------------------------- per sample (workers)


class Skip(NamedTuple):
  """A sample the pipeline drops: reason key, provenance, message."""
  reason: str
  source: str
  message: str


class DecodeSample(grain.transforms.Map):
  """RawSample -> q-independent sample dict, or `Skip` (BadSample re-raised when strict).

  Output: {"enc": EncodedSample, "images": uint8 (5, S, S, 3), "has_image": bool}.
  Cheap text checks run first so that bad records cost no image decode.
  """

  def __init__(self, cfg: DataConfig, tokenizer: Any, q_check: int):
    self._cfg = cfg
    self._tok = tokenizer
    self._q_check = q_check

  def map(self, raw: sources_lib.RawSample):
    try:
      return self._decode(raw)
    except BadSample as e:
      if self._cfg.strict:
        raise
      return Skip(e.reason, e.source or raw.source, getattr(e, "message", "") or str(e))

  def _decode(self, raw: sources_lib.RawSample) -> dict[str, Any]:
    cfg = self._cfg
    record = sources_lib.parse_record(raw)
    enc = conversation_lib.encode_conversation(record, self._tok, cfg.template, source=raw.source)
    # Raises BadSample('no_supervised_tokens') if even the largest q leaves nothing to learn.
    layout_lib.check_sample(enc, q_max=self._q_check, num_image_tokens=cfg.num_image_tokens,
                            seq_len=cfg.seq_len, max_questions=cfg.max_questions)
    if enc.has_image:
      if raw.image_bytes is not None:
        if not raw.image_bytes:
          raise BadSample("missing_image", "record names an image but none is embedded",
                          raw.source)
        data = raw.image_bytes
      else:
        where = f"{raw.source} (id {enc.id})" if enc.id else raw.source
        data = images_lib.resolve_image_path(
            enc.image, raw.image_root, allow_absolute=cfg.allow_absolute_image_paths,
            source=where)
      crops = images_lib.load_static_hd(data, cfg.image_size, raw.source, fast=cfg.fast_images)
    else:
      crops = images_lib.text_only_images(cfg.image_size)
    return {"enc": enc, "images": crops, "has_image": bool(enc.has_image)}


def _fixups_of(enc: Any) -> Sequence[str]:
  fx = getattr(enc, "fixups", ()) or ()
  return (fx,) if isinstance(fx, str) else tuple(fx)


class SkipAwareBatch(grain.IterDataset):
  """Batches good samples only; every batch carries the counts of what was skipped for it.

  Output per batch: {"encs": [EncodedSample] * n, "images": uint8 (n, 5, S, S, 3),
  "has_image": bool (n,), "counts": int64 (len(COUNTER_KEYS),), "skips": [Skip, ...]}.
  n = batch_size except for the last batch of a finite stream (kept unless drop_remainder);
  skips after the last good sample come out in a batch with n = 0 so they are still counted.
  The iterator keeps no buffer between batches, so its state is its parent's state.
  """

  def __init__(self, parent: grain.IterDataset, batch_size: int, drop_remainder: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._shm = False

  def enable_shared_memory_output(self) -> None:
    # grain calls this before shipping the dataset to a worker: stack images straight into
    # shared memory instead of copying them there afterwards.
    self._shm = True

  def __iter__(self):
    return _SkipAwareBatchIterator(self._parent.__iter__(), self._batch_size,
                                   self._drop_remainder, self._shm)

  def __str__(self) -> str:
    return f"SkipAwareBatch(batch_size={self._batch_size})"


class _SkipAwareBatchIterator(grain.DatasetIterator):

  def __init__(self, parent, batch_size: int, drop_remainder: bool, shm: bool):
    super().__init__(parent)
    self._batch_size = batch_size
    self._drop_remainder = drop_remainder
    self._shm = shm

  def __next__(self):
    good: list[dict[str, Any]] = []
    counts = np.zeros((len(COUNTER_KEYS),), np.int64)
    skips: list[Skip] = []
    exhausted = False
    while len(good) < self._batch_size:
      try:
        item = next(self._parent)
      except StopIteration:
        exhausted = True
        break
      if isinstance(item, Skip):
        counts[_COUNTER_INDEX.get(item.reason, _COUNTER_INDEX["other"])] += 1
        if len(skips) < _MAX_SKIP_LOGS_PER_BATCH:
          skips.append(item)
        continue
      good.append(item)
      counts[0] += 1
      for f in _fixups_of(item["enc"]):
        counts[_COUNTER_INDEX.get(f, _COUNTER_INDEX["other"])] += 1
    if exhausted:
      if not good and not counts.any():
        raise StopIteration
      if self._drop_remainder and good:
        # Dropped samples are not counted as batched but as dropped_remainder; the skips
        # found on the way still are.
        counts[0] = 0
        counts[_COUNTER_INDEX["dropped_remainder"]] = len(good)
        for it in good:
          for f in _fixups_of(it["enc"]):
            counts[_COUNTER_INDEX.get(f, _COUNTER_INDEX["other"])] -= 1
        good = []
    return {"encs": [g["enc"] for g in good], "images": self._stack_images(good),
            "has_image": np.asarray([g["has_image"] for g in good], bool),
            "counts": counts, "skips": skips}

  def _stack_images(self, good: list[dict[str, Any]]) -> np.ndarray:
    if not good:
      return np.zeros((0,), np.uint8)
    xs = [g["images"] for g in good]
    shape, dtype = (len(xs),) + xs[0].shape, xs[0].dtype
    if self._shm:
      from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
      return np.stack(xs, out=shared_memory_array.SharedMemoryArray(shape, dtype=dtype))
    return np.stack(xs)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)

  def __str__(self) -> str:
    return f"SkipAwareBatchIterator(batch_size={self._batch_size})"


# ----------------------------------------------------------------------------- per batch (main)

def pad_batch(batch: dict[str, np.ndarray], batch_size: int, pad_id: int) -> dict[str, np.ndarray]:
  """Pads every array to `batch_size` rows with the contract's padding values.

  Padded rows have no real token (token_mask False, labels -100), so they add nothing to the
  token loss or to any per-token metric.
  """
  out = {}
  for k, v in batch.items():
    n = v.shape[0]
    if n >= batch_size:
      out[k] = v
      continue
    fill = batch_spec.pad_value(k, pad_id)
    pad = np.full((batch_size - n,) + v.shape[1:], fill, v.dtype)
    out[k] = np.concatenate([v, pad], axis=0)
  return out


class LayoutBatch:
  """(batch index, worker batch) -> {"batch": contract dict or None, "counts", "skips"}."""

  def __init__(self, cfg: DataConfig, pad_id: int, train: bool):
    self._cfg = cfg
    self._pad_id = pad_id
    self._train = train

  def __call__(self, batch_index: int, wb: dict[str, Any]) -> dict[str, Any]:
    cfg = self._cfg
    encs = wb["encs"]
    if not encs:
      return {"batch": None, "counts": wb["counts"], "skips": wb["skips"]}
    q = layout_lib.batch_q(cfg, batch_index, train=self._train)
    batch = dict(layout_lib.layout_batch(
        encs, q, num_image_tokens=cfg.num_image_tokens, seq_len=cfg.seq_len,
        max_questions=cfg.max_questions, max_instruct_len=cfg.max_instruct_len,
        pad_id=self._pad_id))
    batch["images"] = np.asarray(wb["images"])[:, None]  # (B, P=1, 5, H, W, 3)
    if len(encs) < cfg.batch_size:
      batch = pad_batch(batch, cfg.batch_size, self._pad_id)
    return {"batch": batch, "counts": wb["counts"], "skips": wb["skips"]}


# ----------------------------------------------------------------------------- iterator


class DataIterator:
  """Iterator of host batches (contract dicts of NumPy arrays) with counters and state.

  Attributes:
    counters: cumulative {key: count} over the batches handed out (keys `COUNTER_KEYS`):
      "samples" batched, one entry per skip reason and per fix-up.
    recent_skips: the last 64 `Skip`s (reason, file:line, message), for debugging.
    batches: number of batches handed out (== the next batch index).
  """

  def __init__(self, it: grain.DatasetIterator, cfg: DataConfig, num_records: int):
    self._it = it
    self.cfg = cfg
    self.num_records = num_records
    self.counters: dict[str, int] = {k: 0 for k in COUNTER_KEYS}
    self.recent_skips: collections.deque[Skip] = collections.deque(maxlen=64)
    self._logged: collections.Counter[str] = collections.Counter()

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      item = next(self._it)
      self._count(item["counts"], item["skips"])
      if item["batch"] is not None:
        return item["batch"]

  def _count(self, counts: np.ndarray, skips: Sequence[Skip]) -> None:
    for k, c in zip(COUNTER_KEYS, np.asarray(counts).tolist()):
      self.counters[k] += int(c)
      if k == "dropped_remainder" and c:
        logging.warning("data: the last %d samples (a short final batch) were not trained; "
                        "set data.pad_final_batch=True to train them padded", int(c))
    for s in skips:
      self.recent_skips.append(s)
      if self._logged[s.reason] < self.cfg.log_skips:
        self._logged[s.reason] += 1
        logging.warning("data: skipped sample (%s) at %s: %s", s.reason, s.source, s.message)

  def skip_counters(self) -> dict[str, int]:
    """Non-zero skip / fix-up counts (no "samples"), for the training log."""
    return {k: v for k, v in self.counters.items() if v and k != "samples"}

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable state: grain's iterator state + counters (+ a format version)."""
    return {"version": 1, "grain": self._it.get_state(), "counters": dict(self.counters)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restores `get_state()` output; the next batch is the one that followed it."""
    if int(state.get("version", 0)) != 1 or "grain" not in state:
      raise ValueError("data iterator state: unknown format (expected the dict from "
                       "DataIterator.get_state(), version 1)")
    self._it.set_state(state["grain"])
    self.counters = {k: int(state.get("counters", {}).get(k, 0)) for k in COUNTER_KEYS}

  def close(self) -> None:
    """Stops worker processes and prefetch threads."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def make_pipeline(data_cfg: DataConfig | Mapping[str, Any], tokenizer: Any, *,
                  process_index: int | None = None, process_count: int | None = None,
                  train: bool = True, source: Any = None) -> DataIterator:
  """Builds this host's iterator of fixed-shape batches (see the module docstring).

  Args:
    data_cfg: a `DataConfig`, or a dict / ml_collections.ConfigDict with its fields.
    tokenizer: a `fusion_jax.data.tokenizer.Tokenizer` (shipped to the worker processes).
    process_index, process_count: this host's shard; default jax.process_index() /
      jax.process_count() (grain's ShardByJaxProcess).
    train: True: seeded global shuffle, q drawn per batch, `num_epochs` (None = forever),
      a short final batch is dropped and counted (or padded: pad_final_batch). False: no
      shuffle, one epoch, q = eval_q, the short final batch is padded to batch_size with
      empty examples.
    source: a random-access source to use instead of the config's (tests, custom sources).

  Returns:
    a `DataIterator` of host batches, dicts of NumPy arrays in the batch contract
    (fusion_jax/models/batch_spec.py) with P = data.samples_per_row samples per row.
  """
  cfg = as_data_config(data_cfg)
  if process_index is None or process_count is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  shard = grain.sharding.ShardOptions(process_index, process_count, cfg.shard_drop_remainder)
  try:
    conversation_lib.get_template(cfg.template)
  except BadSample as e:  # a config error, not a sample error: fail at startup
    raise ValueError(f"data config: {e}") from None
  src = build_source(cfg) if source is None else source
  n = len(src)
  if n == 0:
    raise ValueError("data: the configured sources hold no records")

  ds = grain.MapDataset.source(src)
  if train and cfg.shuffle:
    ds = ds.shuffle(seed=cfg.seed)
  stop = n - n % shard.shard_count if shard.drop_remainder else n
  ds = ds[shard.shard_index:stop:shard.shard_count]
  if len(ds) == 0:
    raise ValueError(f"data: host shard {shard.shard_index}/{shard.shard_count} is empty "
                     f"({n} records for {shard.shard_count} hosts)")
  shard_len = len(ds)
  epochs = cfg.num_epochs if train else 1
  if epochs != 1:
    ds = ds.repeat(epochs)
  q_check = layout_lib.largest_batch_q(cfg, train=train)
  ds = ds.map(DecodeSample(cfg, tokenizer, q_check))
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.read_threads, 1),
                                               prefetch_buffer_size=max(cfg.read_buffer, 1)))
  # The packer takes chunks of batch_size samples and decides itself what ends a stream.
  it_ds = SkipAwareBatch(it_ds, cfg.batch_size,
                         drop_remainder=train and not cfg.packing and not cfg.pad_final_batch)
  if cfg.worker_count > 0:
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=cfg.worker_count, per_worker_buffer_size=max(cfg.worker_buffer_size, 1)))
  if cfg.packing:
    it_ds = packing_lib.PackBatches(it_ds, cfg, tokenizer.pad_id, train, len(COUNTER_KEYS))
  else:
    it_ds = it_ds.map_with_index(LayoutBatch(cfg, tokenizer.pad_id, train))
  if cfg.prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(it_ds,
                                                         prefetch_buffer_size=cfg.prefetch)
  logging.info("data: %d records, host shard %d/%d holds %d, batch %d per host, %d workers",
               n, shard.shard_index, shard.shard_count, shard_len,
               cfg.batch_size, cfg.worker_count)
  return DataIterator(iter(it_ds), cfg, n)
