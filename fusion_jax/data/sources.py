"""Random-access record sources: LLaVA JSON / JSONL, ArrayRecord shards (TFDS: synth_tfds).

Every source is a grain-compatible random-access data source (`__len__`, `__getitem__`) whose
elements are `RawSample`s: the still-unparsed record, its provenance and where its image lives.
Parsing and all per-sample checks happen later, inside the pipeline's workers, so that a bad
record becomes a counted skip (`errors.BadSample`) instead of a crash at startup. What IS checked
at startup, with errors naming the file and the fix: missing files and JSON array files that
do not parse at all (a single array cannot be read record by record). Mixtures of these
sources (the authors' YAML, sampling strategies): fusion_jax/data/mixture.py.

Sources are cheap to pickle (grain ships them to every worker process): JSONL files are indexed
by byte offsets and read with `os.pread` from a per-process file handle; JSON arrays are packed
into one contiguous byte buffer plus an offsets array (no per-record Python objects).

ArrayRecord record format (written by `fusion_jax.data.to_arrayrecord`; version tag FJR1)::

    b"FJR1" | uint32 little-endian J | J bytes of UTF-8 JSON | image file bytes (may be empty)

The JSON is the original LLaVA record plus "_source" (its ``file:line`` provenance); the image
bytes are the original file's bytes (JPEG/PNG/...), not re-encoded. Records tagged FSYN (the
same layout, written by `fusion_jax.synth --arrayrecord`) are read as well.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from fusion_jax.data.errors import BadSample

RECORD_MAGIC = b"FJR1"
# fusion_jax.synth's `--arrayrecord` output uses the same layout under this tag (no "_source").
SYNTH_MAGIC = b"FSYN"
ARRAYRECORD_SUFFIX = ".array_record"
_SHARD_RE = re.compile(r"\.array_record(-\d+-of-\d+)?$")


class MixtureError(ValueError):
  """A startup error in the data sources: bad mixture YAML, missing file, unreadable JSON array."""


@dataclasses.dataclass(frozen=True)
class RawSample:
  """One unparsed record as a source hands it out.

  Attributes:
    record: the LLaVA record as a dict, or its JSON text (bytes) still to be parsed by
      `parse_record` (which raises BadSample('bad_json') with `source`).
    source: provenance for logs, ``file:line`` (JSONL), ``file#index`` (JSON array),
      the original ``file:line`` for ArrayRecord/TFDS records when known.
    image_root: directory that relative image paths resolve against ('' = working dir).
    image_bytes: the encoded image when embedded (ArrayRecord, TFDS); None to read the file.
    error: (reason, message) when the source could not even decode the record; sources never
      raise for a bad record (grain calls them outside the pipeline's BadSample handling),
      `parse_record` raises it instead.
  """
  record: dict | bytes
  source: str
  image_root: str = ""
  image_bytes: bytes | None = None
  error: tuple[str, str] | None = None


def parse_record(raw: RawSample) -> dict:
  """The record of `raw` as a dict; BadSample('bad_json') when it is not a JSON object."""
  if raw.error is not None:
    raise BadSample(raw.error[0], raw.error[1], raw.source)
  rec = raw.record
  if isinstance(rec, (bytes, bytearray, memoryview)):
    try:
      rec = json.loads(bytes(rec))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise BadSample("bad_json", f"not valid JSON ({e})", raw.source) from None
  if not isinstance(rec, dict):
    raise BadSample("bad_json", f"a record must be a JSON object, got {type(rec).__name__}",
                    raw.source)
  return rec


# ----------------------------------------------------------------------------- ArrayRecord format


def pack_record(record: dict, image_bytes: bytes = b"", source: str = "") -> bytes:
  """Serialises one sample in the FJR1 format (see module docstring)."""
  rec = dict(record)
  if source:
    rec["_source"] = source
  js = json.dumps(rec, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
  return RECORD_MAGIC + struct.pack("<I", len(js)) + js + (image_bytes or b"")


def unpack_record(data: bytes, where: str = "") -> tuple[dict, bytes, str]:
  """Inverse of `pack_record`: (record, image bytes (b'' if none), provenance).

  Raises BadSample('bad_record') for bytes that are not an FJR1 record.
  """
  data = bytes(data)
  if len(data) < 8 or data[:4] not in (RECORD_MAGIC, SYNTH_MAGIC):
    raise BadSample("bad_record", "not an FJR1/FSYN ArrayRecord record (wrong magic)", where)
  (n,) = struct.unpack("<I", data[4:8])
  if 8 + n > len(data):
    raise BadSample("bad_record", "FJR1 record truncated", where)
  try:
    rec = json.loads(data[8:8 + n])
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise BadSample("bad_json", f"FJR1 record JSON unreadable ({e})", where) from None
  if not isinstance(rec, dict):
    raise BadSample("bad_json", "FJR1 record JSON is not an object", where)
  source = rec.pop("_source", "") or where
  return rec, data[8 + n:], source


# ----------------------------------------------------------------------------- LLaVA JSON / JSONL


class JsonlSource:
  """A LLaVA JSONL file, one record per line; lines are read lazily by byte offset.

  Blank lines are not records. A line that does not parse becomes BadSample('bad_json') with
  ``file:line`` when the pipeline reaches it.
  """

  def __init__(self, path: str, image_root: str = ""):
    self.path = os.path.abspath(path)
    self.image_root = image_root
    if not os.path.isfile(self.path):
      raise MixtureError(f"JSONL file not found: {path}")
    self._starts, self._ends, self._lines = _index_lines(self.path)
    self._fd: int | None = None
    self._pid = -1

  def __len__(self) -> int:
    return int(self._starts.shape[0])

  def __getitem__(self, i: int) -> RawSample:
    i = int(i)
    start, end = int(self._starts[i]), int(self._ends[i])
    data = os.pread(self._handle(), end - start, start)
    return RawSample(data, f"{self.path}:{int(self._lines[i])}", self.image_root)

  def _handle(self) -> int:
    # One descriptor per process: grain workers must not share the parent's file offset state.
    if self._fd is None or self._pid != os.getpid():
      self._fd = os.open(self.path, os.O_RDONLY)
      self._pid = os.getpid()
    return self._fd

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"], state["_pid"] = None, -1
    return state

  def __repr__(self) -> str:
    return f"JsonlSource({self.path!r}, {len(self)} records)"


def _index_lines(path: str, chunk: int = 1 << 26) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(start, end, 1-based line number) of every non-blank line, scanning in 64 MiB chunks."""
  newlines = []
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    pos = 0
    while True:
      buf = f.read(chunk)
      if not buf:
        break
      nl = np.flatnonzero(np.frombuffer(buf, np.uint8) == 0x0A)
      newlines.append(nl.astype(np.int64) + pos)
      pos += len(buf)
  nl = np.concatenate(newlines) if newlines else np.zeros((0,), np.int64)
  starts = np.concatenate([[0], nl + 1]).astype(np.int64)
  ends = np.concatenate([nl, [size]]).astype(np.int64)
  lines = np.arange(1, starts.shape[0] + 1, dtype=np.int64)
  # A line of 0 bytes or a lone '\r' is blank (also drops the empty "line" after a final '\n').
  keep = (ends - starts) > 1
  if np.any((ends - starts) == 1):
    with open(path, "rb") as f:
      for j in np.flatnonzero((ends - starts) == 1):
        f.seek(int(starts[j]))
        if f.read(1) not in (b"\r", b" ", b"\t"):
          keep[j] = True
  return starts[keep], ends[keep], lines[keep]


class JsonSource:
  """A LLaVA JSON file holding one array of records (the authors' released format).

  The array is parsed once at startup (it cannot be read record by record; an unreadable file
  is a MixtureError naming line and column), then packed into one byte buffer so that worker
  processes receive a compact, cheap-to-pickle object.
  """

  def __init__(self, path: str, image_root: str = ""):
    self.path = os.path.abspath(path)
    self.image_root = image_root
    if not os.path.isfile(self.path):
      raise MixtureError(f"JSON file not found: {path}")
    with open(self.path, "rb") as f:
      try:
        records = json.load(f)
      except (UnicodeDecodeError, json.JSONDecodeError) as e:
        where = f"line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise MixtureError(
            f"{path}: not a valid JSON array ({where}: {e}). A .json file must hold one array of "
            "records; for one record per line name the file .jsonl.") from None
    if not isinstance(records, list):
      raise MixtureError(f"{path}: top-level JSON value must be an array of records, "
                         f"got {type(records).__name__}")
    blobs = [json.dumps(r, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
             for r in records]
    del records
    lens = np.fromiter((len(b) for b in blobs), np.int64, len(blobs))
    self._offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
    self._buf = np.frombuffer(b"".join(blobs), np.uint8)

  def __len__(self) -> int:
    return int(self._offsets.shape[0] - 1)

  def __getitem__(self, i: int) -> RawSample:
    i = int(i)
    data = self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes()
    return RawSample(data, f"{self.path}#{i}", self.image_root)

  def __repr__(self) -> str:
    return f"JsonSource({self.path!r}, {len(self)} records)"


# ----------------------------------------------------------------------------- ArrayRecord


def expand_arrayrecord_paths(spec: str | Sequence[str]) -> list[str]:
  """Files for an ArrayRecord spec: a file, a directory (all *.array_record* in it), or a glob."""
  specs = [spec] if isinstance(spec, str) else list(spec)
  out: list[str] = []
  for s in specs:
    if os.path.isdir(s):
      # Shards only: not the converter's *.tmp (incomplete) or *.done.json files.
      found = sorted(p for p in glob.glob(os.path.join(s, "*" + ARRAYRECORD_SUFFIX + "*"))
                     if _SHARD_RE.search(p))
    elif any(c in s for c in "*?["):
      found = sorted(glob.glob(s))
    else:
      found = [s] if os.path.isfile(s) else []
    if not found:
      raise MixtureError(f"no ArrayRecord files found for {s!r} (give a file, a directory of "
                         f"*{ARRAYRECORD_SUFFIX} shards, or a glob)")
    out.extend(os.path.abspath(p) for p in found)
  return out


class ArrayRecordSource:
  """FJR1 records (see module docstring) from one or more ArrayRecord shards."""

  def __init__(self, paths: str | Sequence[str]):
    from array_record.python import array_record_data_source  # pylint: disable=g-import-not-at-top
    self.paths = expand_arrayrecord_paths(paths)
    self._ds = array_record_data_source.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, i: int) -> RawSample:
    i = int(i)
    where = f"arrayrecord#{i}"
    try:
      rec, img, source = unpack_record(self._ds[i], where)
    except BadSample as e:
      return RawSample(b"", where, "", None, (e.reason, e.message))
    return RawSample(rec, source, "", img if rec.get("image") else None)

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, {len(self)} records)"


def iter_records(path: str) -> Iterable[dict[str, Any]]:
  """Records of a LLaVA JSON (list) or JSONL file, read as they are (evaluation and inference
  inputs; the training pipeline reads through the sources above, record by record)."""
  with open(path) as f:
    if path.endswith(".jsonl"):
      for line in f:
        if line.strip():
          yield json.loads(line)
    else:
      yield from json.load(f)
