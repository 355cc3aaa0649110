"""A batching queue in front of a Generator: concurrent requests share one prefill + decode.

The worker thread takes the first waiting request, keeps collecting for `window_s` (or until
`max_batch` are waiting), and runs them as one `Generator.generate` call (which pads them to
its shape buckets). Each request gets its own Completion or its own error; a failing batch is
retried one request at a time so one bad request cannot fail its neighbours. A streamed request
(`submit_stream`) gets its answer's text deltas as they are decoded (sampling.TextStream),
then its Completion; it shares batches with the others like any request.
"""
from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

from absl import logging

from fusion_jax.infer.generator import Completion, Generator
from fusion_jax.infer.sampling import SamplingParams, TextStream


class QueueFull(RuntimeError):
  """More requests are waiting than the queue holds (HTTP 503)."""


@dataclasses.dataclass
class _Pending:
  record: Mapping[str, Any]
  sampling: SamplingParams
  done: threading.Event = dataclasses.field(default_factory=threading.Event)
  result: Completion | None = None
  error: BaseException | None = None
  # Streamed requests: text deltas, then the Completion or the error, in this queue.
  events: queue.Queue[str | Completion | BaseException] | None = None
  stream: TextStream | None = None


@dataclasses.dataclass
class BatchStats:
  """What the worker has run: batches, requests, and the largest batch."""
  batches: int = 0
  requests: int = 0
  largest: int = 0


class Batcher:
  """Thread-safe `submit(record, sampling) -> Completion` over one Generator."""

  def __init__(self, generator: Generator, *, max_batch: int | None = None,
               window_s: float = 0.005, max_queue: int = 256):
    self.generator = generator
    self.max_batch = int(max_batch or generator.max_batch)
    self.window_s = float(window_s)
    self.stats = BatchStats()
    self._queue: queue.Queue[_Pending] = queue.Queue(maxsize=max_queue)
    self._thread = threading.Thread(target=self._loop, name="fusion-batcher", daemon=True)
    self._thread.start()

  def submit(self, record: Mapping[str, Any], sampling: SamplingParams,
             timeout_s: float | None = None) -> Completion:
    """Blocks until the request's completion is ready; re-raises its error.

    Raises QueueFull when the queue is full, TimeoutError after timeout_s.
    """
    item = self._enqueue(_Pending(record, sampling))
    if not item.done.wait(timeout_s):
      raise TimeoutError(f"no completion within {timeout_s} s")
    if item.error is not None:
      raise item.error
    assert item.result is not None
    return item.result

  def submit_stream(self, record: Mapping[str, Any], sampling: SamplingParams,
                    timeout_s: float | None = None) -> Iterator[str | Completion]:
    """Yields the answer's text deltas as they are decoded, then its Completion (whose text is
    the deltas joined); re-raises its error.

    Raises QueueFull at once when the queue is full, TimeoutError when nothing arrives for
    timeout_s.
    """
    item = self._enqueue(_Pending(record, sampling, events=queue.Queue(),
                                  stream=TextStream(sampling.stop)))
    return self._events(item, timeout_s)

  def _enqueue(self, item: _Pending) -> _Pending:
    try:
      self._queue.put_nowait(item)
    except queue.Full:
      raise QueueFull(f"{self._queue.maxsize} requests already waiting; retry later") from None
    return item

  @staticmethod
  def _events(item: _Pending, timeout_s: float | None) -> Iterator[str | Completion]:
    assert item.events is not None
    while True:
      try:
        ev = item.events.get(timeout=timeout_s)
      except queue.Empty:
        raise TimeoutError(f"no progress within {timeout_s} s") from None
      if isinstance(ev, BaseException):
        raise ev
      yield ev
      if isinstance(ev, Completion):
        return

  def _collect(self) -> list[_Pending]:
    items = [self._queue.get()]
    deadline = time.monotonic() + self.window_s
    while len(items) < self.max_batch:
      left = deadline - time.monotonic()
      if left <= 0:
        break
      try:
        items.append(self._queue.get(timeout=left))
      except queue.Empty:
        break
    return items

  def _run(self, items: list[_Pending]) -> None:
    def on_text(index: int, decoded: str) -> None:
      item = items[index]
      if item.stream is not None and (delta := item.stream.update(decoded)):
        item.events.put(delta)

    streamed = any(i.stream is not None for i in items)
    completions = self.generator.generate([i.record for i in items], [i.sampling for i in items],
                                          on_text=on_text if streamed else None)
    for item, c in zip(items, completions):
      item.result = c

  def _loop(self) -> None:
    while True:
      items = self._collect()
      self.stats.batches += 1
      self.stats.requests += len(items)
      self.stats.largest = max(self.stats.largest, len(items))
      try:
        self._run(items)
      except Exception as e:  # noqa: BLE001 - find the culprit, keep serving the others
        logging.exception("generation of a batch of %d failed", len(items))
        if len(items) == 1:
          items[0].error = e
        else:
          for item in items:
            try:
              self._run([item])
            except Exception as e1:  # noqa: BLE001
              item.error = e1
      for item in items:
        if item.result is None and item.error is None:
          item.error = RuntimeError("generation failed; see the server log")
        if item.events is not None:
          if item.result is not None and (rest := item.stream.finish(item.result.text)):
            item.events.put(rest)
          item.events.put(item.result if item.error is None else item.error)
        item.done.set()
