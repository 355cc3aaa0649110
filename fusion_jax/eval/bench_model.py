"""A loaded FUSION model asked benchmark prompts: greedy answers and continuation scores.

A prompt is (text, image) with image = encoded bytes, a file path, a PIL image or None; images
are decoded to static_hd crops per chunk of prompts (never a whole benchmark at once).
Generation goes through fusion_jax.infer.generator.Generator (shape buckets, stop tokens);
prompts are sorted by length first so batches hold similar lengths. A prompt the model cannot
take (longer than its seq_len, an undecodable image, ...) comes back as `Refused` with the
reason instead of being truncated.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from fusion_jax.data.conversation import encode_conversation
from fusion_jax.data.errors import BadSample
from fusion_jax.data.images import load_static_hd, static_hd_crops, text_only_images
from fusion_jax.data.layout import layout_sample
from fusion_jax.data.tokenizer import IMAGE_MARKER
from fusion_jax.eval.closed_qa import make_scorer
from fusion_jax.models import batch_spec

BUCKET = 128  # scoring: sequence lengths padded to a multiple of this (one compile per bucket)
CHUNK_BATCHES = 16  # prompts whose images are decoded at a time, in batches
# (text, image): image = bytes | path | PIL image | None, or a zero-argument callable returning
# one (resolved when needed, so a caller never holds a whole benchmark's images at once)
Prompt = tuple[str, Any]


@dataclasses.dataclass(frozen=True)
class Refused:
  """A prompt the model cannot take, and why."""
  reason: str


def load(path: str, *, step: int | None = None, dtype: str | None = None,
         seq_len: int | None = None) -> Any:
  """The model at `path` (training workdir or model dir): fusion_jax.infer.load.LoadedModel
  (params, cfg, tokenizer, seq_len, max_questions, q, name, step)."""
  from fusion_jax.infer.load import load_model
  return load_model(path, step=step, dtype=dtype, seq_len=seq_len)


def _resolve(image: Any) -> Any:
  return image() if callable(image) else image


def crops(image: Any, size: int, source: str = "") -> np.ndarray:
  """uint8 (5, size, size, 3) static_hd crops of encoded bytes, a file path or a PIL image."""
  if isinstance(image, (bytes, bytearray, memoryview, str, os.PathLike)):
    return load_static_hd(image, size, source=source)
  return static_hd_crops(image.convert("RGB"), size)


def _record(text: str, has_image: bool, i: int, answer: str | None = None) -> dict[str, Any]:
  """A one-question LLaVA record; "image" only marks that there is one (crops go in
  "images")."""
  text = text.replace(IMAGE_MARKER, "").strip()
  rec: dict[str, Any] = {"id": f"prompt {i}", "conversations": [
      {"from": "human", "value": f"{IMAGE_MARKER}\n{text}" if has_image else text}]}
  if has_image:
    rec["image"] = "<decoded>"
  if answer is not None:
    rec["conversations"].append({"from": "gpt", "value": answer})
  return rec


def generate(model: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 16,
             batch_size: int = 8, stop: Sequence[str] = (),
             progress: Callable[[int, int], None] | None = None) -> list[str | Refused]:
  """Greedy answers in prompt order, each cut before the first of `stop` (`Refused` for a
  prompt the model cannot take)."""
  from fusion_jax.infer.generator import Generator
  from fusion_jax.infer.sampling import SamplingParams
  size = model.cfg.vision.image_size
  gen = Generator(model.params, model.cfg, model.tokenizer, q=model.q, max_questions=1,
                  max_seq_len=model.seq_len, max_batch=batch_size, max_new_tokens=max_new_tokens)
  sp = SamplingParams(max_new_tokens=max_new_tokens, stop=tuple(s for s in stop if s))
  out: list[Any] = [None] * len(prompts)
  recs = [_record(t, _resolve(im) is not None, i) for i, (t, im) in enumerate(prompts)]
  lengths = {}
  for i, rec in enumerate(recs):
    try:
      lengths[i] = gen.check(rec, sp, i)[1]
    except ValueError as e:  # too long, LongRoPE crossing, bad conversation (BadSample)
      out[i] = Refused(str(e))
  order = sorted(lengths, key=lengths.get)
  done = len(prompts) - len(order)
  for start in range(0, len(order), CHUNK_BATCHES * batch_size):
    part, ready = [], []
    for i in order[start:start + CHUNK_BATCHES * batch_size]:
      rec = dict(recs[i])
      image = _resolve(prompts[i][1]) if "image" in rec else None
      if image is not None:
        try:
          rec["images"] = crops(image, size, source=rec["id"])
        except BadSample as e:
          out[i] = Refused(str(e))
          continue
        del rec["image"]
      part.append(i)
      ready.append(rec)
    for i, c in zip(part, gen.generate(ready, sp)):
      out[i] = c.text
    done += len(order[start:start + CHUNK_BATCHES * batch_size])
    if progress:
      progress(done, len(prompts))
  return out


def _buckets(lengths: Sequence[int], seq_len: int) -> dict[int, list[int]]:
  """bucket length -> indices of the items padded to it (items over seq_len left out)."""
  out: dict[int, list[int]] = {}
  for i in np.argsort(lengths, kind="stable"):
    n = int(lengths[i])
    if n > seq_len:
      continue
    out.setdefault(min(-(-n // BUCKET) * BUCKET, seq_len), []).append(int(i))
  return out


def loglikelihood(model: Any, items: Sequence[tuple[str, str, Any]], *, batch_size: int = 8
                  ) -> list[tuple[float, bool] | Refused]:
  """(log p(continuation | context, image), continuation is the greedy answer) per
  (context, continuation, image); `Refused` for a pair longer than the model's seq_len or an
  undecodable image.

  The continuation is scored as the model's answer turn: its tokens and the template's end
  token (as lmms-eval's llava scores the answer message) by fusion_jax.eval.closed_qa's scorer
  (one full forward, interaction layers included), as closed_qa scores its candidates.
  """
  cfg, tok = model.cfg, model.tokenizer
  score = make_scorer(cfg)
  size = cfg.vision.image_size
  out: list[Any] = [None] * len(items)
  encs = [encode_conversation(_record(ctx, _resolve(im) is not None, i, answer=cont), tok,
                              cfg.template) for i, (ctx, cont, im) in enumerate(items)]
  lengths = [e.length(model.q, cfg.num_image_tokens) for e in encs]
  for i, n in enumerate(lengths):
    if n > model.seq_len:
      out[i] = Refused(f"prompt {i}: context + continuation take {n} positions; the limit is "
                       f"{model.seq_len} (seq_len; --seq_len raises it up to "
                       f"{cfg.llm.max_position_embeddings})")
  for seq_len, idx in _buckets(lengths, model.seq_len).items():
    for start in range(0, len(idx), batch_size):
      part, rows = [], []
      for i in idx[start:start + batch_size]:
        image = _resolve(items[i][2]) if encs[i].has_image else None
        try:
          images = (crops(image, size, source=f"prompt {i}") if image is not None
                    else text_only_images(size))
        except BadSample as e:
          out[i] = Refused(str(e))
          continue
        ex = layout_sample(encs[i], q=model.q, num_image_tokens=cfg.num_image_tokens,
                           seq_len=seq_len, max_questions=1,
                           max_instruct_len=cfg.max_instruct_len, pad_id=tok.pad_id)
        ex["images"] = images
        part.append(i)
        rows.append(ex)
      if not rows:
        continue
      rows += [rows[-1]] * (batch_size - len(rows))
      logp, greedy = jax.device_get(score(model.params, batch_spec.stack_examples(rows)))
      for j, i in enumerate(part):
        out[i] = (float(logp[j]), bool(greedy[j]))
  return out
