"""Describe and ask stages backed by an LLM over the OpenAI-compatible chat API.

FUSION's data engine (docs/model.md §15): a seed caption is expanded by an LLM into a detailed
description, and an LLM writes question/answer pairs from that description alone.

  backend = LLMBackend(url="http://localhost:8000/v1", model="Qwen/Qwen2.5-72B-Instruct")
  desc = backend.describe("SynthCount", rng)      # -> scene.Description (caption = the text)
  turns = backend.ask(desc, rng)                  # -> [records.Turn, ...]

Prompts are template files (string.Template, `$name` placeholders) in fusion_jax/synth/prompts/:
describe.md / describe_contrast.md (with `$caption`, `$focus` from focus.json), ask_<slug>.md
per category (with `$description` or `$left`, `$right`, `$difference`, and `$format` =
qa_format.md). `prompt_dir` points at a directory whose files replace the packaged ones of the
same name, so prompts can be edited without touching the package.

Replies are JSON objects parsed strictly (`parse_description`, `parse_qa`): a reply that is not
exactly one JSON object (a ```json fence around it is allowed), misses a key, has a closed answer
outside its candidates, too few or too many turns for the category, or repeats a question is
malformed. A malformed reply is asked again with another seed up to `parse_retries` times;
after that the item is dropped with `ItemRejected("malformed_description" | "malformed_qa")`,
counted per reason in stats.json and never written.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import string
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from fusion_jax.synth import scene as S
from fusion_jax.synth.backends import DEFAULTS, BackendSpec, item_seed
from fusion_jax.synth.categories import CATEGORIES, CONTRAST
from fusion_jax.synth.openai_client import METER, ChatClient, RequestRejected
from fusion_jax.synth.records import ANSWER_TYPES, Turn, closed
from fusion_jax.synth.rejection import ItemRejected

PROMPT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prompts")
LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class Rule:
  """What a category's QA reply must hold: turn count range, closed turns needed, default
  answer_type of closed turns, and whether an open turn is required."""
  min_turns: int
  max_turns: int
  min_closed: int
  answer_type: str
  need_open: bool = False


RULES: dict[str, Rule] = {
    "SynthColor": Rule(1, 1, 1, "color"),
    "SynthCount": Rule(1, 1, 1, "count"),
    "SynthSpatial": Rule(1, 1, 1, "spatial"),
    "SynthScene": Rule(1, 1, 1, "choice"),
    "SynthText": Rule(1, 1, 1, "text"),
    "SynthMultiChoice": Rule(1, 1, 1, "choice"),
    "SynthConvShort": Rule(2, 3, 1, "choice"),
    "SynthConvLong": Rule(3, 5, 1, "choice", need_open=True),
    "SynthContrastShort": Rule(1, 2, 1, "difference"),
    "SynthContrastLong": Rule(1, 3, 0, "difference", need_open=True),
    "SynthReasoning": Rule(1, 2, 1, "yes_no"),
    "SynthTextQA": Rule(1, 3, 1, "text"),
}
assert set(RULES) == set(CATEGORIES)


def slug(category: str) -> str:
  """'SynthConvShort' -> 'convshort' (the ask_<slug>.md prompt file)."""
  return category[len("Synth"):].lower()


class Prompts:
  """The prompt templates: packaged files, each replaceable by a same-named file in `user_dir`.

  All files are read once, here, so a run uses one version of them (edits take effect on the
  next run, which the resumable engine refuses to mix with the old version's items).
  """

  def __init__(self, user_dir: str | None = None):
    if user_dir is not None and not os.path.isdir(user_dir):
      raise FileNotFoundError(f"prompt directory {user_dir!r} does not exist (it should hold "
                              f"files named like those in {PROMPT_DIR})")
    self.user_dir = user_dir
    self.texts: dict[str, str] = {}
    for name in sorted(os.listdir(PROMPT_DIR)):
      with open(self.path(name), encoding="utf-8") as f:
        self.texts[name] = f.read().strip()

  def path(self, name: str) -> str:
    if self.user_dir and os.path.exists(os.path.join(self.user_dir, name)):
      return os.path.join(self.user_dir, name)
    return os.path.join(PROMPT_DIR, name)

  def text(self, name: str) -> str:
    if name not in self.texts:
      raise FileNotFoundError(f"no prompt {name!r} in {PROMPT_DIR}")
    return self.texts[name]

  def fingerprint(self) -> str:
    """sha1 of every prompt text in use."""
    return hashlib.sha1(json.dumps(self.texts, sort_keys=True).encode("utf-8")).hexdigest()

  def render(self, name: str, **values: str) -> str:
    try:
      return string.Template(self.text(name)).substitute(values)
    except (KeyError, ValueError) as e:
      raise ValueError(f"prompt {self.path(name)}: bad placeholder {e}; available: "
                       f"{', '.join('$' + k for k in values)} (write $$ for a literal $)") from e

  def focus(self, category: str) -> str:
    try:
      table = json.loads(self.text("focus.json"))
    except json.JSONDecodeError as e:
      raise ValueError(f"{self.path('focus.json')}: not valid JSON ({e})") from None
    if category not in table:
      raise ValueError(f"{self.path('focus.json')}: no entry for {category}")
    return table[category]


class Malformed(ValueError):
  """An LLM reply that breaks the expected format (the message says how)."""


_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", flags=re.S)


def parse_json_object(reply: str) -> dict[str, Any]:
  """The single JSON object a reply consists of (optionally inside one ``` fence)."""
  text = reply.strip()
  m = _FENCE.match(text)
  if m:
    text = m.group(1).strip()
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise Malformed(f"not a JSON object ({e.msg} at char {e.pos})") from None
  if not isinstance(obj, dict):
    raise Malformed(f"expected a JSON object, got {type(obj).__name__}")
  return obj


def _as_str(v: Any) -> Any:
  """Integers become strings (a count answered as 3 instead of "3"); anything else is kept."""
  return str(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _text(obj: Mapping[str, Any], key: str) -> str:
  v = _as_str(obj.get(key))
  if not isinstance(v, str) or not v.strip():
    raise Malformed(f"{key!r} must be a non-empty string")
  return " ".join(v.split())


def parse_description(reply: str, contrast: bool) -> dict[str, str]:
  """{"description"} or, for contrast categories, {"left", "right", "difference"}."""
  obj = parse_json_object(reply)
  keys = ("left", "right", "difference") if contrast else ("description",)
  out = {k: _text(obj, k) for k in keys}
  if contrast and out["left"] == out["right"]:
    raise Malformed("left and right descriptions are identical")
  return out


def _candidates(item: Mapping[str, Any], k: int) -> list[str]:
  cands = item.get("candidates")
  cands = [_as_str(c) for c in cands] if isinstance(cands, list) else cands
  if not isinstance(cands, list) or not all(isinstance(c, str) and c.strip() for c in cands):
    raise Malformed(f"qa[{k}]: 'candidates' must be a list of non-empty strings")
  cands = [" ".join(c.split()) for c in cands]
  if not 2 <= len(cands) <= 8 or len({c.lower() for c in cands}) != len(cands):
    raise Malformed(f"qa[{k}]: 'candidates' must hold 2 to 8 distinct strings")
  return cands


def _match(answer: str, options: Sequence[str], k: int) -> str:
  """The option an answer names (case-insensitive, trailing full stop ignored)."""
  key = answer.lower().rstrip(".")
  hits = [o for o in options if o.lower().rstrip(".") == key]
  if len(hits) != 1:
    raise Malformed(f"qa[{k}]: answer {answer!r} is not one of {options}")
  return hits[0]


def parse_qa(reply: str, category: str, rng: np.random.Generator) -> list[Turn]:
  """Turns from a {"qa": [...]} reply, validated against the category's Rule.

  Closed turns: "answer" must be one of "candidates" (2-8 distinct strings) and "answer_type" one
  of records.ANSWER_TYPES (the category's default when absent). SynthMultiChoice: "options"
  (4 distinct) instead of candidates; the options are shuffled with `rng` so the correct letter
  is uniform, and the answer is that letter.
  """
  rule = RULES[category]
  items = parse_json_object(reply).get("qa")
  if not isinstance(items, list) or not items:
    raise Malformed("'qa' must be a non-empty list")
  if not rule.min_turns <= len(items) <= rule.max_turns:
    raise Malformed(f"{category} needs {rule.min_turns}-{rule.max_turns} turns, got "
                    f"{len(items)}")
  turns: list[Turn] = []
  for k, it in enumerate(items):
    if not isinstance(it, Mapping):
      raise Malformed(f"qa[{k}] must be an object")
    q, a = _text(it, "question"), _text(it, "answer")
    if category == "SynthMultiChoice":
      opts = it.get("options")
      if (not isinstance(opts, list) or len(opts) != len(LETTERS)
          or not all(isinstance(o, str) and o.strip() for o in opts)):
        raise Malformed(f"qa[{k}]: 'options' must be {len(LETTERS)} non-empty strings")
      opts = [" ".join(o.split()) for o in opts]
      if len({o.lower() for o in opts}) != len(opts):
        raise Malformed(f"qa[{k}]: options repeat")
      right = _match(a, opts, k)
      opts = [opts[int(i)] for i in rng.permutation(len(opts))]
      letter = LETTERS[opts.index(right)]
      lines = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, opts))
      q = f"{q}\n{lines}\nAnswer with the option's letter from the given choices directly."
      turns.append(Turn(q, letter, closed(letter, "choice", LETTERS, "choice_llm",
                                          options=opts)))
      continue
    if it.get("candidates") is not None:
      cands = _candidates(it, k)
      a = _match(a, cands, k)
      atype = it.get("answer_type", rule.answer_type)
      if atype not in ANSWER_TYPES:
        raise Malformed(f"qa[{k}]: answer_type {atype!r} is not one of {ANSWER_TYPES}")
      turns.append(Turn(q, a, closed(a, atype, cands, "llm")))
    else:
      turns.append(Turn(q, a))
  if len({t.question.lower() for t in turns}) != len(turns):
    raise Malformed("a question repeats")
  n_closed = sum(t.qa is not None for t in turns)
  if n_closed < rule.min_closed:
    raise Malformed(f"{category} needs >= {rule.min_closed} closed question(s) with "
                    f"candidates, got {n_closed}")
  if rule.need_open and n_closed == len(turns):
    raise Malformed(f"{category} needs an open question (no candidates)")
  return turns


def read_captions(path: str) -> list[str]:
  """Seed captions: a .jsonl file of {"caption": ...} lines or a text file, one per line."""
  caps = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      if path.endswith(".jsonl"):
        try:
          line = json.loads(line)["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
          raise ValueError(f"{path}:{n}: expected a JSON object with a \"caption\" string") \
              from None
      caps.append(str(line))
  if not caps:
    raise ValueError(f"{path}: no captions (one per line, or {{\"caption\": ...}} per line in a "
                     ".jsonl file)")
  return caps


class LLMBackend:
  """Describer and Asker over an OpenAI-compatible chat endpoint (module docstring).

  url / model: the endpoint ("http://host:8000/v1") and the served model name.
  temperature, max_tokens: sampling; every request carries a seed drawn from the item's rng.
  json_mode: send response_format={"type": "json_object"} (vLLM, SGLang and OpenAI honour it).
  parse_retries: how often a malformed reply is asked again (with a new seed) before rejecting.
  seed_captions: a caption file (read_captions); default: the procedural describer's caption
    for the category (`seed_describer`, an import path or spec).
  prompt_dir: directory of prompt files overriding the packaged ones (Prompts).
  system: optional system message sent before every prompt.
  timeout_s, max_retries, backoff_s, max_backoff_s, max_concurrency, api_key_env: the
    ChatClient's.
  """

  def __init__(self, url: str, model: str, temperature: float = 0.7, max_tokens: int = 1024,
               json_mode: bool = True, parse_retries: int = 2,
               seed_captions: str | None = None, seed_describer: str | Mapping | None = None,
               prompt_dir: str | None = None, system: str | None = None,
               timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0,
               max_backoff_s: float = 60.0, max_concurrency: int = 16,
               api_key_env: str = "OPENAI_API_KEY"):
    self.client = ChatClient(url, model, api_key_env=api_key_env, timeout_s=timeout_s,
                             max_retries=max_retries, backoff_s=backoff_s,
                             max_backoff_s=max_backoff_s, max_concurrency=max_concurrency)
    self.temperature = temperature
    self.max_tokens = max_tokens
    self.json_mode = json_mode
    self.parse_retries = parse_retries
    self.prompts = Prompts(prompt_dir)
    self.system = system
    self.captions = read_captions(seed_captions) if seed_captions else None
    self.seed_describer = (None if self.captions else BackendSpec.parse(
        seed_describer or DEFAULTS["describer"]).build("describer"))

  def fingerprint(self) -> str:
    """What decides this backend's items beyond its kwargs: prompt texts, caption pool."""
    extra = json.dumps([self.prompts.fingerprint(), self.captions, self.system])
    return hashlib.sha1(extra.encode("utf-8")).hexdigest()

  def _ask_llm(self, prompt: str, rng: np.random.Generator, parse: Callable[[str], Any],
               reason: str) -> Any:
    messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
        [{"role": "user", "content": prompt}]
    problem = ""
    for attempt in range(self.parse_retries + 1):
      if attempt:
        METER.retried(reason)  # re-asks are counted with the HTTP retries (run_log.jsonl)
      reply = self.client.chat(messages, temperature=self.temperature,
                               max_tokens=self.max_tokens, seed=item_seed(rng),
                               json_mode=self.json_mode)
      try:
        return parse(reply)
      except Malformed as e:
        problem = str(e)
    raise ItemRejected(reason, problem)

  def seed_caption(self, category: str, rng: np.random.Generator) -> str:
    if self.captions is not None:
      return self.captions[int(rng.integers(len(self.captions)))]
    return self.seed_describer.describe(category, rng).caption

  def describe(self, category: str, rng: np.random.Generator) -> S.Description:
    caption = self.seed_caption(category, rng)
    contrast = category in CONTRAST
    prompt = self.prompts.render("describe_contrast.md" if contrast else "describe.md",
                                 caption=caption, focus=self.prompts.focus(category))
    try:
      d = self._ask_llm(prompt, rng, lambda r: parse_description(r, contrast),
                        "malformed_description")
    except RequestRejected as e:
      raise ItemRejected("request_rejected", str(e)) from e
    focus: dict[str, Any] = {"seed_caption": caption}
    if contrast:
      focus.update(panel_prompts=[d["left"], d["right"]], difference=d["difference"])
      text = f"Left image: {d['left']} Right image: {d['right']}"
    else:
      text = d["description"]
    return S.Description(category=category, caption=text, focus=focus)

  def ask(self, desc: S.Description, rng: np.random.Generator) -> list[Turn]:
    fmt = self.prompts.render("qa_format.md", answer_types=", ".join(ANSWER_TYPES))
    if desc.category in CONTRAST:
      left, right = desc.focus.get("panel_prompts", (desc.caption, desc.caption))
      values = {"left": left, "right": right,
                "difference": desc.focus.get("difference", "(not stated)")}
    else:
      values = {"description": desc.caption}
    prompt = self.prompts.render(f"ask_{slug(desc.category)}.md", format=fmt, **values)
    try:
      return self._ask_llm(prompt, rng, lambda r: parse_qa(r, desc.category, rng),
                           "malformed_qa")
    except RequestRejected as e:
      raise ItemRejected("request_rejected", str(e)) from e
