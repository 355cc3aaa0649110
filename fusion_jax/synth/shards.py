"""Append-only shard files of finished items: what a resumable synthesis run has done so far.

  <out>/shards/shard-00000.jsonl   items 0 .. shard_size-1, one JSON line per finished item
  <out>/shards/shard-00001.jsonl   items shard_size .. 2*shard_size-1, ...

A line is {"index": i, "category": c, "reason": null | "<rejection reason>", "record": {...}}
("record" and the image file only for kept items; "scene" too when scenes are written). The
image is written (atomically, by rename) before its line, and every line is flushed as soon as
it is written, so after a crash or kill every line names a finished item and its image exists;
a torn last line is ignored on reading (that item is simply made again).
"""
from __future__ import annotations

import json
import os
import threading
from typing import Any, Mapping, TextIO

SHARD_DIR = "shards"


def shard_path(out: str, shard: int) -> str:
  return os.path.join(out, SHARD_DIR, f"shard-{shard:05d}.jsonl")


def write_atomic(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{threading.get_ident()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


class ShardStore:
  """Finished items of a run in `<out>/shards/` (module docstring)."""

  def __init__(self, out: str, shard_size: int):
    if shard_size < 1:
      raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    self.out, self.shard_size = out, shard_size
    self._files: dict[int, TextIO] = {}
    self._lock = threading.Lock()
    os.makedirs(os.path.join(out, SHARD_DIR), exist_ok=True)

  def load(self) -> dict[int, dict[str, Any]]:
    """index -> entry of every finished item (torn or unparsable lines are skipped)."""
    done: dict[int, dict[str, Any]] = {}
    d = os.path.join(self.out, SHARD_DIR)
    for name in sorted(os.listdir(d)):
      if not (name.startswith("shard-") and name.endswith(".jsonl")):
        continue
      with open(os.path.join(d, name), encoding="utf-8") as f:
        for line in f:
          try:
            e = json.loads(line)
          except json.JSONDecodeError:
            continue
          if isinstance(e, dict) and isinstance(e.get("index"), int):
            done[e["index"]] = e
    return done

  def _file(self, shard: int) -> TextIO:
    f = self._files.get(shard)
    if f is None:
      path = shard_path(self.out, shard)
      torn = os.path.exists(path) and os.path.getsize(path) > 0 and \
          open(path, "rb").read()[-1:] != b"\n"
      f = self._files[shard] = open(path, "a", encoding="utf-8")
      if torn:  # start after a line cut short by a crash
        f.write("\n")
    return f

  def append(self, entry: Mapping[str, Any]) -> None:
    line = json.dumps(entry, sort_keys=True, ensure_ascii=False) + "\n"
    with self._lock:
      f = self._file(entry["index"] // self.shard_size)
      f.write(line)
      f.flush()

  def close(self) -> None:
    with self._lock:
      for f in self._files.values():
        f.close()
      self._files.clear()
