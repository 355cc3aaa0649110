"""Data mixtures: the authors' mixture YAML and plain path lists -> one random-access source.

Mixture YAML (the authors' / LLaVA-OneVision format, plus two optional keys of ours)::

    datasets:
      - json_path: jsons/LLaVA-Pretrain-558k.json     # .json (array) or .jsonl
        sampling_strategy: "all"                      # all | first:N | end:N | random:N, N or N%
      - json_path: jsons/SynthColor-244k.jsonl
        sampling_strategy: "random:10%"
        image_root: /data/synth/images                # ours: overrides the config's image_root
      - arrayrecord_path: /data/shards/pretrain       # ours: ArrayRecord file, directory or glob
        sampling_strategy: "first:1000"

N% takes ceil(N * len / 100) records (as LLaVA-NeXT does); N larger than the file is clamped
with a warning. `random:N` draws N distinct records with a generator seeded by (seed, path), so
every host builds the identical global list before sharding. Relative paths in the YAML
(json_path, arrayrecord_path, image_root) resolve against the YAML file's folder only.
"""
from __future__ import annotations

import dataclasses
import math
import os
import zlib
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np
import yaml

from fusion_jax.data.sources import (ArrayRecordSource, JsonlSource, JsonSource, MixtureError,
                                     RawSample, expand_arrayrecord_paths)

SAMPLING_KINDS = ("all", "first", "end", "random")
MIXTURE_KEYS = ("json_path", "arrayrecord_path", "sampling_strategy", "image_root")


def parse_sampling(strategy: Any, where: str = "") -> tuple[str, float | None, bool]:
  """'all' | 'first:N' | 'end:N' | 'random:N', N an int or a percentage 'P%'.

  Returns (kind, N or P, is_percent). Raises MixtureError naming `where` on anything else.
  """
  if not isinstance(strategy, str):
    raise MixtureError(f"{where}sampling_strategy must be a string like 'all', 'first:1000', "
                       f"'random:10%', got {strategy!r}")
  s = strategy.strip()
  if s == "all":
    return "all", None, False
  kind, sep, num = s.partition(":")
  kind, num = kind.strip(), num.strip()
  if not sep or kind not in SAMPLING_KINDS or kind == "all":
    raise MixtureError(f"{where}sampling_strategy {strategy!r} not understood; use all, first:N, "
                       "end:N or random:N (N a count or a percentage like 10%)")
  percent = num.endswith("%")
  try:
    value = float(num[:-1]) if percent else int(num)
  except ValueError:
    raise MixtureError(f"{where}sampling_strategy {strategy!r}: N must be an integer or a "
                       "percentage like 25%") from None
  if value <= 0 or (percent and value > 100):
    raise MixtureError(f"{where}sampling_strategy {strategy!r}: N must be > 0"
                       + (" and <= 100%" if percent else ""))
  return kind, value, percent


def sample_indices(n_total: int, strategy: str, *, seed: int, key: str,
                   where: str = "") -> np.ndarray:
  """Indices selected by a sampling strategy from a source of `n_total` records (int64)."""
  kind, value, percent = parse_sampling(strategy, where)
  if kind == "all":
    return np.arange(n_total, dtype=np.int64)
  n = math.ceil(value * n_total / 100) if percent else int(value)
  if n > n_total:
    logging.warning("%ssampling_strategy %r asks for %d records, the source has %d: using all.",
                    where, strategy, n, n_total)
    n = n_total
  if kind == "first":
    return np.arange(n, dtype=np.int64)
  if kind == "end":
    return np.arange(n_total - n, n_total, dtype=np.int64)
  # random: identical on every host (seeded by seed and the path), sorted for read locality.
  rng = np.random.default_rng([seed & 0xFFFFFFFF, zlib.crc32(key.encode("utf-8"))])
  return np.sort(rng.choice(n_total, size=n, replace=False)).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
  """One validated entry of a mixture: a path, its kind and sampling strategy."""
  path: str
  kind: str  # "json" | "jsonl" | "arrayrecord"
  sampling_strategy: str = "all"
  image_root: str = ""


def _resolve(path: str, base_dir: str) -> str:
  """A path written in the YAML: absolute as given, relative to the YAML's folder (never to
  the working directory, which would make a mixture mean different files from run to run)."""
  path = os.path.expanduser(path)
  if os.path.isabs(path) or "://" in path:
    return path
  return os.path.normpath(os.path.join(base_dir, path))


def json_kind(path: str) -> str:
  """'json' or 'jsonl' from the file name (the authors decide by extension too)."""
  if path.endswith(".jsonl"):
    return "jsonl"
  if path.endswith(".json"):
    return "json"
  raise MixtureError(f"{path}: unsupported file type; LLaVA data must be .json (one array) or "
                     ".jsonl (one record per line)")


def parse_mixture(path: str, image_root: str = "") -> list[MixtureEntry]:
  """Validates a mixture YAML (schema in the module docstring) -> entries; MixtureError if bad."""
  if not os.path.isfile(path):
    raise MixtureError(f"mixture file not found: {path}")
  with open(path) as f:
    try:
      doc = yaml.safe_load(f)
    except yaml.YAMLError as e:
      raise MixtureError(f"mixture {path}: not valid YAML: {e}") from None
  if not isinstance(doc, dict) or "datasets" not in doc:
    raise MixtureError(f"mixture {path}: top level must be a mapping with a 'datasets' list, "
                       "e.g.\ndatasets:\n  - json_path: a.json\n    sampling_strategy: all")
  extra = sorted(set(doc) - {"datasets"})
  if extra:
    raise MixtureError(f"mixture {path}: unknown top-level keys {extra}; only 'datasets' is allowed")
  items = doc["datasets"]
  if not isinstance(items, list) or not items:
    raise MixtureError(f"mixture {path}: 'datasets' must be a non-empty list")
  base = os.path.dirname(os.path.abspath(path))
  entries = []
  for k, item in enumerate(items):
    where = f"mixture {path}: datasets[{k}]: "
    if not isinstance(item, dict):
      raise MixtureError(f"{where}each entry must be a mapping with json_path and "
                         f"sampling_strategy, got {item!r}")
    unknown = sorted(set(item) - set(MIXTURE_KEYS))
    if unknown:
      raise MixtureError(f"{where}unknown keys {unknown}; allowed: {list(MIXTURE_KEYS)}")
    has_json, has_ar = "json_path" in item, "arrayrecord_path" in item
    if has_json == has_ar:
      raise MixtureError(f"{where}give exactly one of json_path or arrayrecord_path")
    strategy = item.get("sampling_strategy", "all")
    parse_sampling(strategy, where)
    root = item.get("image_root")
    if root is not None and not isinstance(root, str):
      raise MixtureError(f"{where}image_root must be a string path")
    if has_json:
      p = item["json_path"]
      if not isinstance(p, str) or not p:
        raise MixtureError(f"{where}json_path must be a non-empty string")
      p = _resolve(p, base)
      kind = json_kind(p)
      if not os.path.isfile(p):
        raise MixtureError(f"{where}json_path {item['json_path']!r} not found (looked at {p})")
    else:
      p = item["arrayrecord_path"]
      if not isinstance(p, str) or not p:
        raise MixtureError(f"{where}arrayrecord_path must be a non-empty string")
      p = _resolve(p, base)
      kind = "arrayrecord"
      try:
        expand_arrayrecord_paths(p)
      except MixtureError as e:
        raise MixtureError(f"{where}{e}") from None
    # The entry's own image_root is written in the YAML (relative to it); the config's is not.
    root = _resolve(root, base) if root else image_root
    entries.append(MixtureEntry(p, kind, strategy.strip(), root))
  return entries


def open_entry(entry: MixtureEntry):
  """The random-access source for one mixture entry (before sampling)."""
  if entry.kind == "jsonl":
    return JsonlSource(entry.path, entry.image_root)
  if entry.kind == "json":
    return JsonSource(entry.path, entry.image_root)
  if entry.kind == "arrayrecord":
    return ArrayRecordSource(entry.path)
  raise MixtureError(f"unknown source kind {entry.kind!r}")


class MixtureSource:
  """Concatenation of sources, each restricted to an index selection (its sampling strategy)."""

  def __init__(self, parts: Sequence[tuple[Any, np.ndarray]], names: Sequence[str] = ()):
    self.parts = [(src, np.asarray(idx, np.int64)) for src, idx in parts]
    self.names = list(names) or [repr(s) for s, _ in self.parts]
    self._cum = np.cumsum([0] + [len(idx) for _, idx in self.parts]).astype(np.int64)

  def __len__(self) -> int:
    return int(self._cum[-1])

  def __getitem__(self, i: int) -> RawSample:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"index {i} out of range for a mixture of {len(self)} records")
    k = int(np.searchsorted(self._cum, i, side="right") - 1)
    src, idx = self.parts[k]
    return src[int(idx[i - self._cum[k]])]

  def sizes(self) -> list[tuple[str, int]]:
    """(name, selected records) per part, in order, for the startup log."""
    return [(n, int(len(idx))) for n, (_, idx) in zip(self.names, self.parts)]

  def __repr__(self) -> str:
    return f"MixtureSource({len(self.parts)} parts, {len(self)} records)"


def load_mixture(path: str, *, seed: int = 0, image_root: str = "") -> MixtureSource:
  """Parses, validates and samples a mixture YAML into one random-access source."""
  entries = parse_mixture(path, image_root)
  parts, names = [], []
  opened: dict[tuple[str, str, str], Any] = {}  # a file listed twice is read once
  for k, e in enumerate(entries):
    key = (e.kind, e.path, e.image_root)
    src = opened[key] = opened.get(key) or open_entry(e)
    idx = sample_indices(len(src), e.sampling_strategy, seed=seed, key=e.path,
                         where=f"mixture {path}: datasets[{k}]: ")
    parts.append((src, idx))
    names.append(os.path.basename(e.path))
  mix = MixtureSource(parts, names)
  logging.info("mixture %s: %d records: %s", path, len(mix), mix.sizes())
  return mix


def source_from_paths(paths: Sequence[str], image_root: str = "") -> MixtureSource:
  """All records of LLaVA JSON/JSONL files and/or ArrayRecord shards (files, dirs, globs)."""
  if isinstance(paths, str):
    paths = [paths]
  if not paths:
    raise MixtureError("no data paths given")
  parts, names = [], []
  for p in paths:
    if p.endswith((".json", ".jsonl")):
      src = open_entry(MixtureEntry(os.path.abspath(p), json_kind(p), "all", image_root))
    else:
      src = ArrayRecordSource(p)
    parts.append((src, np.arange(len(src), dtype=np.int64)))
    names.append(os.path.basename(p.rstrip("/")))
  return MixtureSource(parts, names)
