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
from safetensors import safe_open
from safetensors.numpy import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


class SafetensorsReader:
  """Lazy view of all tensors in a checkpoint directory (single file or sharded)."""

  def __init__(self, directory: str):
    self.directory = directory
    index = os.path.join(directory, INDEX_NAME)
    single = os.path.join(directory, SINGLE_NAME)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      self._file_of = {k: os.path.join(directory, v) for k, v in weight_map.items()}
    elif os.path.exists(single):
      with safe_open(single, "np") as f:
        self._file_of = {k: single for k in f.keys()}
    else:
      files = sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(
            f"{directory}: no {SINGLE_NAME}, {INDEX_NAME} or *.safetensors file; "
            "point at a transformers save_pretrained directory.")
      self._file_of = {}
      for n in files:
        with safe_open(os.path.join(directory, n), "np") as f:
          for k in f.keys():
            self._file_of[k] = os.path.join(directory, n)
    self._handles: dict[str, object] = {}

  def _handle(self, path: str):
    if path not in self._handles:
      self._handles[path] = safe_open(path, "np")
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
    return self._handle(self._file_of[key]).get_tensor(key)


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
