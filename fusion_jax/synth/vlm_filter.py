"""Filter stage backed by a vision-language model over the OpenAI-compatible chat API.

For every question of an item the VLM sees the rendered image (a PNG data: URL in an image_url
content part, which vLLM, SGLang, OpenAI and fusion_jax's own server accept) and votes:

  mode "verify"  every turn: "Is the proposed answer correct for this image?" -> yes / no
  mode "answer"  closed turns: the VLM answers from the candidates; a vote is yes when it picks
                 the item's answer (harder to fool than verify's yes-bias); open turns: verify

A turn holds when at least `min_yes` of `votes` votes say yes (votes stop early once the outcome
is decided, so clear cases cost fewer requests); an item is kept when every turn holds. Votes
use prompts/verify.md and prompts/answer.md (override with `prompt_dir`). The base filter (the
procedural one by default: structural checks, plus pixel checks for structured scenes) runs
first and costs no request.

Rejection reasons (counted in stats.json): "vlm_disagree" (a turn got fewer than `min_yes` yes
votes) and "vlm_malformed" (unparsable votes left too few valid ones to decide).
"""
from __future__ import annotations

import base64
import io
import zlib
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from fusion_jax.data.tokenizer import IMAGE_MARKER
from fusion_jax.synth import scene as S
from fusion_jax.synth.backends import DEFAULTS, BackendSpec
from fusion_jax.synth.llm_backend import Malformed, Prompts, _match, parse_json_object
from fusion_jax.synth.openai_client import ChatClient, RequestRejected
from fusion_jax.synth.records import Turn


def image_data_url(image: np.ndarray) -> str:
  """(H, W, 3) uint8 -> "data:image/png;base64,..."."""
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", compress_level=1)
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def question_text(turn: Turn) -> str:
  return turn.question.replace(IMAGE_MARKER, "").strip()


class VLMFilter:
  """Filter: base filter, then k-of-n VLM votes per question (module docstring).

  url / model: the VLM endpoint ("http://host:8000/v1") and model name.
  votes / min_yes: the agreement rule (min_yes of votes; votes 1, min_yes 1 = one judgement).
  mode: "verify" or "answer". temperature: sampling of the votes (> 0 so votes can differ;
    each vote carries its own seed; at temperature 0 the votes of a question all agree).
  max_tokens / json_mode: per vote (json_mode off by default: not every server honours
    response_format with images). base_filter: import path or spec of the filter run first
    (None: none). prompt_dir: overrides of verify.md / answer.md (llm_backend.Prompts).
  timeout_s, max_retries, backoff_s, max_backoff_s, max_concurrency, api_key_env: the
    ChatClient's.
  """

  def __init__(self, url: str, model: str, votes: int = 3, min_yes: int = 2,
               mode: str = "answer", temperature: float = 0.7, max_tokens: int = 64,
               json_mode: bool = False, base_filter: str | Mapping | None = DEFAULTS["filter"],
               prompt_dir: str | None = None, timeout_s: float = 120.0, max_retries: int = 5,
               backoff_s: float = 1.0, max_backoff_s: float = 60.0, max_concurrency: int = 16,
               api_key_env: str = "OPENAI_API_KEY"):
    if not 1 <= min_yes <= votes:
      raise ValueError(f"VLMFilter: need 1 <= min_yes <= votes, got min_yes={min_yes}, "
                       f"votes={votes}")
    if mode not in ("verify", "answer"):
      raise ValueError(f"VLMFilter: mode must be 'verify' or 'answer', got {mode!r}")
    self.client = ChatClient(url, model, api_key_env=api_key_env, timeout_s=timeout_s,
                             max_retries=max_retries, backoff_s=backoff_s,
                             max_backoff_s=max_backoff_s, max_concurrency=max_concurrency)
    self.votes, self.min_yes, self.mode = votes, min_yes, mode
    self.temperature, self.max_tokens, self.json_mode = temperature, max_tokens, json_mode
    self.base = BackendSpec.parse(base_filter).build("filter") if base_filter else None
    self.prompts = Prompts(prompt_dir)

  def fingerprint(self) -> str:
    """What decides this filter's verdicts beyond its kwargs: the prompt texts."""
    return self.prompts.fingerprint()

  def _vote(self, url: str, turn: Turn, seed: int) -> bool | None:
    """One vote: True / False, or None for a reply that breaks the format."""
    closed = self.mode == "answer" and turn.qa is not None
    if closed:
      text = self.prompts.render("answer.md", question=question_text(turn),
                                 candidates=", ".join(turn.qa["candidates"]))
    else:
      text = self.prompts.render("verify.md", question=question_text(turn), answer=turn.answer)
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": text}]}]
    reply = self.client.chat(messages, temperature=self.temperature, max_tokens=self.max_tokens,
                             seed=seed, json_mode=self.json_mode)
    try:
      obj = parse_json_object(reply)
      if closed:
        return _match(str(obj.get("answer", "")), list(turn.qa["candidates"]), 0) == turn.answer
      verdict = str(obj.get("verdict", "")).strip().lower()
      if verdict not in ("yes", "no"):
        raise Malformed(f"verdict {verdict!r}")
      return verdict == "yes"
    except Malformed:
      return None

  def _holds(self, url: str, turn: Turn, seed: int) -> str | None:
    """None when the turn holds, else the rejection reason."""
    yes = no = bad = 0
    for v in range(self.votes):
      vote = self._vote(url, turn, seed + v)
      yes += vote is True
      no += vote is False
      bad += vote is None
      if yes >= self.min_yes:
        return None
      if self.votes - no - bad < self.min_yes:  # even all remaining votes cannot reach min_yes
        return "vlm_malformed" if bad > no else "vlm_disagree"
    return "vlm_malformed" if bad > no else "vlm_disagree"

  def check(self, desc: S.Description, turns: Sequence[Turn], image: np.ndarray | None
            ) -> str | None:
    if self.base is not None:
      reason = self.base.check(desc, turns, image)
      if reason is not None:
        return reason
    if image is None:
      return None
    url = image_data_url(image)
    # Seeds from the item's content: the filter protocol has no rng, and reruns must agree.
    seed = zlib.crc32(desc.caption.encode("utf-8"))
    for k, turn in enumerate(turns):
      try:
        reason = self._holds(url, turn, seed + 1000 * k)
      except RequestRejected:
        return "request_rejected"
      if reason is not None:
        return reason
    return None
