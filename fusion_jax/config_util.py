"""The two config helpers every config reader shares: dataclass configs from plain dicts
(`from_dict`) and dotted-key overrides of an experiment config (`with_overrides`, ml_collections'
own path, as --config.KEY=VALUE takes)."""
from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")


def from_dict(cls: type[T], d: Mapping[str, Any], what: str,
              convert: Mapping[str, Callable[[Any], Any]] | None = None) -> T:
  """cls(**d) for the dataclass `cls`: unknown keys are a ValueError naming them and the known
  ones (prefixed by `what`, e.g. "data config"); a ConfigDict is read as its plain dict.

  Args:
    convert: field -> function applied to that field's value when present (nested configs,
      "4,16" strings, ...).
  """
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  names = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(d) - names)
  if unknown:
    raise ValueError(f"{what}: unknown keys {unknown}; known: {sorted(names)}")
  kw = dict(d)
  for key, fn in (convert or {}).items():
    if key in kw:
      kw[key] = fn(kw[key])
  return cls(**kw)


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                   where: str) -> ml_collections.ConfigDict:
  """A copy of `config` with `overrides` ({dotted key: value}, e.g. {"data.seq_len": 128}) set
  through ml_collections' update_from_flattened_dict on the locked copy, as config flags do: a
  key that does not exist is a ValueError naming `where` and the key (typos fail here)."""
  c = copy.deepcopy(config)  # keeps typed None fields settable from the command line
  locked = c.is_locked
  c.lock()
  for key, value in overrides.items():
    try:
      c.update_from_flattened_dict({key: value})
    except (KeyError, AttributeError) as e:
      hint = str(e).strip("'\"").split("Did you mean ")
      raise ValueError(f"{where}: unknown config key {key!r}"
                       + (f" (did you mean {hint[1]})" if len(hint) > 1 else "")) from None
  if not locked:
    c.unlock()
  return c
