"""Sampling: how the next token is picked from the logits and where an answer ends.

Per row: temperature (0 = greedy), top_k (0 = off), top_p (1 = off) and a seed
(`SamplingParams`, `sample_tokens`, traceable); an answer ends at a stop token (the template's
end token or EOS, `stop_ids`) or at the first of its stop strings (`cut_at_stop`, checked on
the host); `TextStream` turns a growing answer into deltas for streaming. The batched decode
loop that uses them: fusion_jax/infer/generator.py.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fusion_jax.data.conversation import get_template
from fusion_jax.data.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-prompt generation settings.

  max_new_tokens: answer length limit (tokens, stop token excluded).
  temperature: 0 = greedy; otherwise sample from softmax(logits / temperature), restricted to
    the top_k most likely tokens (0 = all) and then to the smallest set whose probability
    reaches top_p (1 = all; ties at a threshold are kept).
  stop: strings that end the answer (the text is cut before the first one).
  seed: sampling seed of this prompt (None: derived from the call's seed and the row).
  """
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  stop: tuple[str, ...] = ()
  seed: int | None = None

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
    if not self.temperature >= 0.0:
      raise ValueError(f"temperature={self.temperature} must be >= 0")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k} must be >= 0")
    object.__setattr__(self, "stop", tuple(str(s) for s in self.stop))
    if any(not s for s in self.stop):
      raise ValueError("stop strings must be non-empty")


def stop_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
  """Token ids that end an answer: the template's end token(s) and the tokenizer's EOS."""
  ids = [tokenizer.token_to_id(t) for t in get_template(template).stop_strings]
  ids.append(getattr(tokenizer, "eos_id", None))
  return tuple(sorted({int(i) for i in ids if i is not None and i >= 0}))


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array,
                  top_p: jax.Array, keys: jax.Array) -> jax.Array:
  """Next tokens (B,) int32 from logits (B, V): greedy rows (temperature <= 0) take the argmax;
  the others sample within their top_k / top_p set (see SamplingParams). keys: (B,) keys."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def sampled(_):
    v = logits.shape[-1]
    scaled = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)[:, None]
    desc = -jnp.sort(-scaled, axis=-1)  # (B, V) descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)  # (B, 1)
    probs = jax.nn.softmax(jnp.where(jnp.arange(v)[None] < k[:, None], desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each sorted entry
    n_keep = jnp.maximum(jnp.sum(before < top_p[:, None], axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    masked = jnp.where(scaled >= jnp.maximum(kth, pth), scaled, -jnp.inf)
    draw = jax.vmap(lambda key, lg: jax.random.categorical(key, lg))(keys, masked)
    return jnp.where(temperature > 0, draw.astype(jnp.int32), greedy)

  return jax.lax.cond(jnp.any(temperature > 0), sampled, lambda _: greedy, None)


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
  """(text before the first occurrence of any stop string, whether one occurred)."""
  hits = [i for i in (text.find(s) for s in stop) if i >= 0]
  return (text[:min(hits)], True) if hits else (text, False)


def answer_text(decoded: str, stop: Sequence[str]) -> str:
  """An answer's final text from its decoded tokens: cut at the first stop string, stripped."""
  return cut_at_stop(decoded, stop)[0].strip()


class TextStream:
  """Text deltas of an answer being generated, whose concatenation is its final text.

  `update(decoded)` takes the answer decoded so far and returns the part that is now safe to
  send. The final text is cut at a stop string and stripped (`answer_text`), so a delta holds
  back the tail that could still begin a stop string, trailing whitespace and a trailing U+FFFD
  (a multi-byte character whose remaining bytes are not decoded yet). `finish(final_text)`
  returns the rest. Text sent is never taken back: should a tokenizer re-spell earlier text as
  tokens arrive, the stream waits until the text again extends what was sent (`finish` sends
  nothing if the final text does not).
  """

  def __init__(self, stop: Sequence[str] = ()):
    self.stop = tuple(stop)
    self.sent = ""

  def update(self, decoded: str) -> str:
    text, hit = cut_at_stop(decoded, self.stop)
    text = text.lstrip()
    if not hit:
      hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])),
                 default=0)
      text = text[:len(text) - hold]
    while text and (text[-1].isspace() or text[-1] == "\ufffd"):
      text = text[:-1]
    return self._advance(text)

  def finish(self, final_text: str) -> str:
    return self._advance(final_text)

  def _advance(self, text: str) -> str:
    if len(text) <= len(self.sent) or not text.startswith(self.sent):
      return ""
    delta, self.sent = text[len(self.sent):], text
    return delta
