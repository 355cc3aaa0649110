"""A small client for the OpenAI-compatible chat API (vLLM, SGLang, TGI, fusion_jax.serve).

Standard library only (urllib). One `ChatClient` per endpoint:

  client = ChatClient("http://localhost:8000/v1", model="Qwen/Qwen2.5-72B-Instruct")
  text = client.chat([{"role": "user", "content": "..."}], seed=7)

Transient failures (timeouts, connection errors, HTTP 429 and 5xx) are retried with exponential
backoff and jitter (a 429's Retry-After is honoured, capped at `max_backoff_s`); other 4xx
answers are permanent (`RequestRejected`). When the retries run out, `RequestFailed` names the
last reason. At most `max_concurrency` requests per client are in flight at once.

Every request sent is counted in the process-wide `METER` (requests, retries by reason), which
also enforces the run's request budget (`--budget-requests`): once spent, `chat` raises
`BudgetExhausted` without sending anything, so a run never exceeds its budget.
"""
from __future__ import annotations

import collections
import http.client
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Mapping, Sequence


class RequestFailed(RuntimeError):
  """A transient failure (timeout, 429, 5xx, connection) that outlived its retries."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class RequestRejected(RuntimeError):
  """The server refused the request for good (4xx other than 429, or a malformed envelope)."""

  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


class BudgetExhausted(RuntimeError):
  """The run's request budget is spent; nothing was sent."""


class Meter:
  """Thread-safe request counters and the optional request budget (process-wide: `METER`)."""

  def __init__(self) -> None:
    self._lock = threading.Lock()
    self.reset()

  def reset(self, budget: int | None = None) -> None:
    with self._lock:
      self.budget = budget
      self.requests = 0
      self.retries: collections.Counter = collections.Counter()

  def take(self) -> None:
    """Account for one request about to be sent; raise BudgetExhausted when none is left."""
    with self._lock:
      if self.budget is not None and self.requests >= self.budget:
        raise BudgetExhausted(f"request budget of {self.budget} spent")
      self.requests += 1

  def retried(self, reason: str) -> None:
    with self._lock:
      self.retries[reason] += 1

  def exhausted(self) -> bool:
    with self._lock:
      return self.budget is not None and self.requests >= self.budget

  def snapshot(self) -> dict[str, Any]:
    with self._lock:
      return {"requests": self.requests, "budget": self.budget,
              "retries": dict(sorted(self.retries.items()))}


METER = Meter()


def _is_timeout(e: BaseException) -> bool:
  return isinstance(e, (TimeoutError, socket.timeout)) or "timed out" in str(e)


class ChatClient:
  """POST {base_url}/chat/completions with retries, backoff and bounded concurrency.

  base_url: e.g. "http://localhost:8000/v1" (the part before /chat/completions).
  api_key_env: environment variable holding a bearer token (unset: no Authorization header).
  timeout_s: per-request socket timeout; max_retries: retries after the first attempt.
  backoff_s / max_backoff_s: the k-th retry waits min(max_backoff_s, backoff_s * 2**k) * U(0.5, 1).
  """

  def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY",
               timeout_s: float = 120.0, max_retries: int = 5, backoff_s: float = 1.0,
               max_backoff_s: float = 60.0, max_concurrency: int = 16):
    if not base_url.startswith(("http://", "https://")):
      raise ValueError(f"chat endpoint {base_url!r} must start with http:// or https:// (e.g. "
                       "http://localhost:8000/v1)")
    if max_concurrency < 1 or max_retries < 0:
      raise ValueError("ChatClient: max_concurrency must be >= 1 and max_retries >= 0")
    self.url = base_url.rstrip("/") + "/chat/completions"
    self.model = model
    self.api_key_env = api_key_env
    self.timeout_s = timeout_s
    self.max_retries = max_retries
    self.backoff_s = backoff_s
    self.max_backoff_s = max_backoff_s
    self._slots = threading.BoundedSemaphore(max_concurrency)

  def _headers(self) -> dict[str, str]:
    h = {"Content-Type": "application/json"}
    key = os.environ.get(self.api_key_env, "") if self.api_key_env else ""
    if key:
      h["Authorization"] = f"Bearer {key}"
    return h

  def _post(self, body: bytes) -> dict[str, Any]:
    req = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
    with self._slots, urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
      return json.loads(resp.read().decode("utf-8"))

  def _wait(self, attempt: int, retry_after: float | None) -> None:
    delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * random.uniform(0.5, 1.0)
    if retry_after is not None:
      delay = min(self.max_backoff_s, max(delay, retry_after))
    time.sleep(delay)

  def chat(self, messages: Sequence[Mapping[str, Any]], temperature: float = 0.7,
           max_tokens: int = 1024, seed: int | None = None, json_mode: bool = False,
           extra: Mapping[str, Any] | None = None) -> str:
    """The assistant message text of one chat completion."""
    payload: dict[str, Any] = {"model": self.model, "messages": list(messages),
                               "temperature": temperature, "max_tokens": max_tokens}
    if seed is not None:
      payload["seed"] = int(seed)
    if json_mode:
      payload["response_format"] = {"type": "json_object"}
    payload.update(extra or {})
    body = json.dumps(payload).encode("utf-8")
    last = "unknown"
    for attempt in range(self.max_retries + 1):
      METER.take()
      retry_after = None
      try:
        reply = self._post(body)
      except urllib.error.HTTPError as e:
        detail = e.read()[:300].decode("utf-8", "replace")
        if e.code != 429 and e.code < 500:
          raise RequestRejected(f"http_{e.code}", f"{self.url}: HTTP {e.code}: {detail}") from e
        last = "http_429" if e.code == 429 else "http_5xx"
        ra = e.headers.get("Retry-After") if e.headers else None
        retry_after = float(ra) if ra and ra.replace(".", "", 1).isdigit() else None
      except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
        if isinstance(e, ValueError) and not isinstance(e, json.JSONDecodeError):
          raise
        reason = getattr(e, "reason", e)
        last = ("timeout" if _is_timeout(reason) else
                "bad_envelope" if isinstance(e, json.JSONDecodeError) else "connection")
      else:
        try:
          content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
          content = None
        if not isinstance(content, str):
          raise RequestRejected("bad_envelope", f"{self.url}: reply has no "
                                f"choices[0].message.content: {str(reply)[:300]}")
        return content
      if attempt < self.max_retries:
        METER.retried(last)
        self._wait(attempt, retry_after)
    raise RequestFailed(last, f"{self.url}: gave up after {self.max_retries + 1} attempts "
                              f"(last failure: {last})")
