"""Checkpoint reader stand-ins with keys and shapes only (no tensor data), for the config
derivation of fusion_jax.convert (fusion_torch_config, hf_siglip)."""
from __future__ import annotations

from collections.abc import Mapping

from fusion_jax.convert import fusion_torch


class ShapeOnlyReader:
  """A reader of `shapes` ({key: shape}); `directory` is where it claims to read from."""

  def __init__(self, shapes: Mapping[str, tuple[int, ...]], directory: str = "/nonexistent"):
    self.directory, self._shapes = directory, shapes

  def keys(self):
    return list(self._shapes)

  def __contains__(self, key):
    return key in self._shapes

  def shape(self, key):
    return self._shapes[key]


class ShapeReader(ShapeOnlyReader):
  """Keys and shapes of a FUSION checkpoint for `cfg`, without data."""

  def __init__(self, cfg, directory):
    super().__init__(fusion_torch.expected_torch_shapes(cfg), directory)
