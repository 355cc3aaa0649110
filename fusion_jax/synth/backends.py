"""Stage protocols, backend loading by import path, and adapters for users' own generators.

The engine runs four stages per item, each behind a small protocol:

  Describer.describe(category, rng) -> scene.Description          (text first)
  Renderer.render(description, size, rng) -> (size, size, 3) uint8 (image from text)
  Asker.ask(description, rng) -> list[records.Turn]                 (questions from text)
  Filter.check(description, turns, image) -> reason | None          (reject bad items)

`rng` is a numpy Generator derived from (seed, item index, stage), so any backend that draws
its randomness from it is deterministic and independent of worker count.

Backends are named by import path "package.module:Attribute" in a `BackendConfig` (or a JSON
file, `--backends FILE`). The attribute may be a class or factory (called with the spec's
"kwargs") or a ready instance. Every stage defaults to the procedural backend.

Two adapters connect generators that only map text to text / text to image:
  LLMWriter: a Describer and Asker around `generate(prompt, seed) -> str` (an LLM).
  TextToImageRenderer: a Renderer around `generate_image(prompt, size, seed) -> image`.
Items from them have no structured scene, so the filter applies its structural checks only.
docs/synth.md has a worked example.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import re
from typing import Any, Callable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from fusion_jax.synth import scene as S
from fusion_jax.synth.records import ANSWER_TYPES, Turn, closed


@runtime_checkable
class Describer(Protocol):
  def describe(self, category: str, rng: np.random.Generator) -> S.Description:
    ...


@runtime_checkable
class Renderer(Protocol):
  def render(self, desc: S.Description, size: int, rng: np.random.Generator) -> np.ndarray:
    ...


@runtime_checkable
class Asker(Protocol):
  def ask(self, desc: S.Description, rng: np.random.Generator) -> list[Turn]:
    ...


@runtime_checkable
class Filter(Protocol):
  def check(self, desc: S.Description, turns: Sequence[Turn], image: np.ndarray | None
            ) -> str | None:
    ...


STAGES: dict[str, type] = {"describer": Describer, "renderer": Renderer, "asker": Asker,
                           "filter": Filter}
DEFAULTS: dict[str, str] = {
    "describer": "fusion_jax.synth.describe:ProceduralDescriber",
    "renderer": "fusion_jax.synth.render:ProceduralRenderer",
    "asker": "fusion_jax.synth.ask:ProceduralAsker",
    "filter": "fusion_jax.synth.filter:ProceduralFilter",
}


def load_object(path: str) -> Any:
  """Import "package.module:attr.sub" (or "package.module.attr") and return the attribute."""
  if ":" in path:
    mod_name, attr = path.split(":", 1)
  else:
    mod_name, _, attr = path.rpartition(".")
  if not mod_name or not attr:
    raise ValueError(f"backend path {path!r} must look like 'package.module:Name'")
  try:
    obj: Any = importlib.import_module(mod_name)
  except ImportError as e:
    raise ImportError(f"backend path {path!r}: cannot import module {mod_name!r} ({e}); is it "
                      "on PYTHONPATH?") from e
  for part in attr.split("."):
    if not hasattr(obj, part):
      raise AttributeError(f"backend path {path!r}: {mod_name!r} has no attribute {attr!r}")
    obj = getattr(obj, part)
  return obj


@dataclasses.dataclass(frozen=True)
class BackendSpec:
  """One stage's backend: import path and keyword arguments for the class / factory."""
  path: str
  kwargs: tuple[tuple[str, Any], ...] = ()

  @classmethod
  def parse(cls, spec: "str | Mapping[str, Any] | BackendSpec") -> "BackendSpec":
    if isinstance(spec, BackendSpec):
      return spec
    if isinstance(spec, str):
      return cls(path=spec)
    if isinstance(spec, Mapping) and "path" in spec:
      kw = spec.get("kwargs", {}) or {}
      frozen = tuple(sorted((str(k), _freeze(v)) for k, v in kw.items()))
      return cls(path=spec["path"], kwargs=frozen)
    raise ValueError(f"backend spec {spec!r} must be an import path or {{'path': ..., 'kwargs': "
                     "{...}}")

  def build(self, stage: str) -> Any:
    obj = load_object(self.path)
    kwargs = {k: _thaw(v) for k, v in self.kwargs}
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, STAGES[stage])):
      obj = obj(**kwargs)
    elif kwargs:
      raise ValueError(f"{stage} backend {self.path!r} is an instance; it takes no kwargs")
    if not isinstance(obj, STAGES[stage]):
      method = {"describer": "describe", "renderer": "render", "asker": "ask",
                "filter": "check"}[stage]
      raise TypeError(f"{stage} backend {self.path!r} has no {method}() method (see "
                      "fusion_jax/synth/backends.py for the protocol)")
    return obj

  def to_json(self) -> dict[str, Any]:
    return {"path": self.path, "kwargs": {k: _thaw(v) for k, v in self.kwargs}}


def _freeze(v: Any) -> Any:
  if isinstance(v, Mapping):
    return ("__dict__",) + tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
  if isinstance(v, (list, tuple)):
    return tuple(_freeze(x) for x in v)
  return v


def _thaw(v: Any) -> Any:
  if isinstance(v, tuple) and v and v[0] == "__dict__":
    return {k: _thaw(x) for k, x in v[1:]}
  if isinstance(v, tuple):
    return [_thaw(x) for x in v]
  return v


@dataclasses.dataclass(frozen=True)
class BackendConfig:
  """Which backend runs each stage (hashable; picklable into worker processes)."""
  describer: BackendSpec = BackendSpec(DEFAULTS["describer"])
  renderer: BackendSpec = BackendSpec(DEFAULTS["renderer"])
  asker: BackendSpec = BackendSpec(DEFAULTS["asker"])
  filter: BackendSpec = BackendSpec(DEFAULTS["filter"])

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "BackendConfig":
    unknown = set(d) - set(STAGES)
    if unknown:
      raise ValueError(f"backend config: unknown stage(s) {sorted(unknown)}; stages are "
                       f"{list(STAGES)}")
    return cls(**{k: BackendSpec.parse(v) for k, v in d.items()})

  @classmethod
  def from_json_file(cls, path: str) -> "BackendConfig":
    with open(path) as f:
      return cls.from_dict(json.load(f))

  def to_dict(self) -> dict[str, Any]:
    return {k: getattr(self, k).to_json() for k in STAGES}

  def build(self) -> dict[str, Any]:
    """stage name -> backend instance."""
    return {k: getattr(self, k).build(k) for k in STAGES}


def _as_callable(fn: str | Callable) -> Callable:
  return load_object(fn) if isinstance(fn, str) else fn


def item_seed(rng: np.random.Generator) -> int:
  """A 31-bit seed for generators that take an integer seed."""
  return int(rng.integers(0, 2**31 - 1))


class LLMWriter:
  """Describer + Asker around a text generator, FUSION-style (docs/model.md §15).

  generate: callable or import path, `generate(prompt: str, seed: int) -> str`.
  seed_describer: backend that supplies the seed caption per category (default procedural);
    the LLM expands it into a detailed description.
  describe_prompt / ask_prompt: format strings with {category}, {caption} / {description}.
  The ask reply must contain a JSON list of {"question", "answer"[, "candidates",
  "answer_type"]}; entries with candidates become closed questions.
  """

  DESCRIBE_PROMPT = ("Expand this image caption into a detailed, concrete description of the "
                     "picture (objects, colours, counts, positions, any written text). Focus on "
                     "what a {category} question would ask about.\nCaption: {caption}\n"
                     "Description:")
  ASK_PROMPT = ("Write question-answer pairs about the picture described below, answerable "
                "from the picture alone. Reply with a JSON list of objects with keys "
                "\"question\", \"answer\" and, for short closed answers, \"candidates\" (the "
                "list of possible answers) and \"answer_type\" (one of: {answer_types}).\n"
                "Description: {description}\nJSON:")

  def __init__(self, generate: str | Callable, seed_describer: str | Mapping | None = None,
               describe_prompt: str | None = None, ask_prompt: str | None = None,
               max_turns: int = 4):
    self.generate = _as_callable(generate)
    self.seed_describer = BackendSpec.parse(seed_describer or DEFAULTS["describer"]).build(
        "describer")
    self.describe_prompt = describe_prompt or self.DESCRIBE_PROMPT
    self.ask_prompt = ask_prompt or self.ASK_PROMPT
    self.max_turns = max_turns

  def describe(self, category: str, rng: np.random.Generator) -> S.Description:
    seed_caption = self.seed_describer.describe(category, rng).caption
    text = self.generate(self.describe_prompt.format(category=category, caption=seed_caption),
                         item_seed(rng)).strip()
    return S.Description(category=category, caption=text, focus={"seed_caption": seed_caption})

  def ask(self, desc: S.Description, rng: np.random.Generator) -> list[Turn]:
    reply = self.generate(self.ask_prompt.format(description=desc.caption,
                                                 answer_types=", ".join(ANSWER_TYPES)),
                          item_seed(rng))
    return parse_qa_json(reply)[:self.max_turns]


def parse_qa_json(reply: str) -> list[Turn]:
  """Turns from an LLM reply holding a JSON list; malformed entries are skipped (the filter
  rejects an item left with no turns as degenerate)."""
  m = re.search(r"\[.*\]", reply, flags=re.S)
  if not m:
    return []
  try:
    items = json.loads(m.group(0))
  except json.JSONDecodeError:
    return []
  turns = []
  for it in items if isinstance(items, list) else []:
    if not isinstance(it, Mapping):
      continue
    q, a = str(it.get("question", "")).strip(), str(it.get("answer", "")).strip()
    if not q or not a:
      continue
    cands = it.get("candidates")
    qa = None
    if isinstance(cands, list) and cands:
      cands = [str(c).strip() for c in cands]
      qa = closed(a, str(it.get("answer_type", "choice")), cands, "llm")
    turns.append(Turn(q, a, qa, None))
  return turns


class TextToImageRenderer:
  """Renderer around a text-to-image generator.

  generate_image: callable or import path, `generate_image(prompt: str, size: int, seed: int)`
    returning a PIL image or an (H, W, 3) uint8 array; resized to size x size if needed.
  prompt: format string with {caption}.
  """

  def __init__(self, generate_image: str | Callable, prompt: str = "{caption}"):
    self.generate_image = _as_callable(generate_image)
    self.prompt = prompt

  def render(self, desc: S.Description, size: int, rng: np.random.Generator) -> np.ndarray:
    out = self.generate_image(self.prompt.format(caption=desc.caption), size, item_seed(rng))
    im = out if isinstance(out, Image.Image) else Image.fromarray(np.asarray(out, np.uint8))
    im = im.convert("RGB")
    if im.size != (size, size):
      im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im)
