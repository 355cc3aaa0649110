"""Streaming safetensors I/O without torch (numpy + ml_dtypes).

A checkpoint directory holds `model.safetensors` or shards listed by
`model.safetensors.index.json`. Tensors are read one at a time, so converting a model never
holds two full copies in host memory.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class CheckpointFileError(ValueError):
  """A checkpoint file that cannot be read (truncated, damaged, not what it claims to be)."""


def open_safetensors(path: str):
  """safe_open(path) with an error naming the file and the fix instead of a bare
  SafetensorError (a truncated download fails here: the header no longer covers the file)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such safetensors file (listed by the checkpoint); "
                            "copy the complete checkpoint directory again")
  try:
    return safe_open(path, "np")
  except (SafetensorError, OSError) as e:
    raise CheckpointFileError(
        f"{path}: not a readable safetensors file ({e}); it is truncated or damaged: download "
        "or copy it again (its size should match the original)") from None


def _read_index(path: str) -> dict[str, str]:
  """weight_map of a model.safetensors.index.json, with errors naming the file."""
  try:
    with open(path) as f:
      index = json.load(f)
  except json.JSONDecodeError as e:
    raise CheckpointFileError(f"{path}: not valid JSON ({e}); copy the checkpoint's index "
                              "file again") from None
  weight_map = index.get("weight_map") if isinstance(index, dict) else None
  if not isinstance(weight_map, dict):
    raise CheckpointFileError(f"{path}: no 'weight_map' object (tensor name -> shard file); "
                              "not a transformers safetensors index, copy it again")
  return weight_map


class SafetensorsReader:
  """Lazy view of all tensors in a checkpoint directory (single file or sharded)."""

  def __init__(self, directory: str):
    self.directory = directory
    self._handles: dict[str, object] = {}
    index = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.exists(index):
      weight_map = _read_index(index)
      self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
      for path in sorted(set(self._file_of.values())):  # a bad shard fails here, named
        self._handle(path)
    elif os.path.exists(single):
      self._file_of = {k: single for k in self._handle(single).keys()}
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(
            f"{directory}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file; "
            "point at a transformers save_pretrained directory.")
      self._file_of = {}
      for n in files:
        path = os.path.join(directory, n)
        for k in self._handle(path).keys():
          self._file_of[k] = path

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = open_safetensors(path)
    return self._handles[path]

  def keys(self) -> list[str]:
    return list(self._file_of)

  def __contains__(self, key: str) -> bool:
    return key in self._file_of

  def shape(self, key: str) -> tuple[int, ...]:
    return tuple(self._handle(self._file_of[key]).get_slice(key).get_shape())

  def get(self, key: str) -> np.ndarray:
    if key not in self._file_of:
      raise KeyError(f"{self.directory}: tensor {key!r} not found in checkpoint")
    path = self._file_of[key]
    try:
      return self._handle(path).get_tensor(key)
    except SafetensorError as e:
      raise CheckpointFileError(f"{path}: tensor {key!r} cannot be read ({e}); the file is "
                                "damaged: copy it again") from None


def write_safetensors(directory: str, tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes tensors as `model.safetensors` or shards + index (transformers' naming).

  `tensors` may be a generator of (name, array) so that callers stream; a shard is flushed when
  it reaches `max_shard_bytes`. Returns the file names written.
  """
  os.makedirs(directory, exist_ok=True)
  items = tensors.items() if isinstance(tensors, Mapping) else tensors
  meta = {"format": "pt", **(metadata or {})}
  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  tmp_names: list[str] = []
  weight_map: dict[str, str] = {}
  total = 0

  def flush():
    name = f"shard-{len(tmp_names):05d}.tmp.safetensors"
    save_file(shards[-1], os.path.join(directory, name), metadata=meta)
    tmp_names.append(name)

  for key, arr in items:
    arr = np.ascontiguousarray(arr)
    if shards[-1] and size + arr.nbytes > max_shard_bytes:
      flush()
      shards.append({})
      size = 0
    shards[-1][key] = arr
    weight_map[key] = str(len(shards) - 1)
    size += arr.nbytes
    total += arr.nbytes
  flush()
  shards.clear()
  n = len(tmp_names)
  if n == 1:
    final = [SINGLE_NAME]
  else:
    final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
  for tmp, fin in zip(tmp_names, final):
    os.replace(os.path.join(directory, tmp), os.path.join(directory, fin))
    os.chmod(os.path.join(directory, fin), 0o644)  # safetensors writes 0600; others must read
  if n > 1:
    index = {"metadata": {"total_size": total},
             "weight_map": {k: final[int(v)] for k, v in weight_map.items()}}
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
      json.dump(index, f, indent=2)
  return final
