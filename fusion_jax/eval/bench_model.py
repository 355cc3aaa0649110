"""A loaded FUSION model asked benchmark prompts: greedy answers and continuation scores.

A prompt is (text, image) with image = encoded bytes, a file path, a PIL image or None. Images
that are not files already go to a temporary directory (the generation and scoring batch
builders read image files). Prompts are sorted by length and cut into length buckets
(multiples of BUCKET positions, at most the model's seq_len), so a benchmark compiles a handful
of shapes instead of padding every prompt to the model's longest layout; a prompt longer than
the model's seq_len is refused with a reason instead of truncated.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.data.conversation import encode_conversation
from fusion_jax.data.errors import BadSample
from fusion_jax.data.images import load_static_hd, text_only_images
from fusion_jax.data.layout import layout_sample
from fusion_jax.data.tokenizer import IMAGE_MARKER
from fusion_jax.models import fusion

BUCKET = 128  # prompt lengths are padded to a multiple of this (one compile per bucket)
Prompt = tuple[str, Any]  # (text, image bytes | path | PIL image | None)


def load(path: str, *, step: int | None = None, dtype: str | None = None) -> Any:
  """The model at `path` (training workdir or model dir): fusion_jax.infer.load.LoadedModel
  (params, cfg, tokenizer, seq_len, max_questions, q, name, step)."""
  from fusion_jax.infer.load import load_model
  return load_model(path, step=step, dtype=dtype)


def _image_file(image: Any, tmp: str, i: int) -> str | None:
  """A file path for a prompt's image (None: text-only)."""
  if image is None:
    return None
  if isinstance(image, (str, os.PathLike)):
    return os.path.abspath(os.fspath(image))
  path = os.path.join(tmp, f"{i}.img")
  if isinstance(image, (bytes, bytearray, memoryview)):
    with open(path, "wb") as f:
      f.write(bytes(image))
  else:  # a PIL image
    image.convert("RGB").save(path, format="PNG")
  return path


def _record(text: str, image_path: str | None, i: int, answer: str | None = None
            ) -> dict[str, Any]:
  text = text.replace(IMAGE_MARKER, "").strip()
  rec: dict[str, Any] = {"id": f"prompt {i}", "conversations": [
      {"from": "human", "value": f"{IMAGE_MARKER}\n{text}" if image_path else text}]}
  if image_path:
    rec["image"] = image_path
  if answer is not None:
    rec["conversations"].append({"from": "gpt", "value": answer})
  return rec


def _buckets(lengths: Sequence[int], seq_len: int) -> dict[int, list[int]]:
  """bucket length -> indices of the prompts padded to it (prompts over seq_len left out)."""
  out: dict[int, list[int]] = {}
  for i in np.argsort(lengths, kind="stable"):
    n = int(lengths[i])
    if n > seq_len:
      continue
    out.setdefault(min(-(-n // BUCKET) * BUCKET, seq_len), []).append(int(i))
  return out


def generate(model: Any, prompts: Sequence[Prompt], *, max_new_tokens: int = 16,
             batch_size: int = 8, progress: Callable[[int, int], None] | None = None
             ) -> list[str | None]:
  """Greedy answers, in prompt order; None for a prompt longer than the model's seq_len."""
  from fusion_jax.infer.generate import answer
  cfg, tok = model.cfg, model.tokenizer
  out: list[str | None] = [None] * len(prompts)
  with tempfile.TemporaryDirectory() as tmp:
    recs = [_record(t, _image_file(im, tmp, i), i) for i, (t, im) in enumerate(prompts)]
    lengths = [encode_conversation(r, tok, cfg.template, add_generation_prompt=True)
               .length(model.q, cfg.num_image_tokens) for r in recs]
    done = 0
    for seq_len, idx in _buckets(lengths, model.seq_len).items():
      for start in range(0, len(idx), 64 * batch_size):  # progress every 64 batches
        part = idx[start:start + 64 * batch_size]
        answers = answer(model.params, cfg, tok, [recs[i] for i in part], image_root="",
                         q=model.q, seq_len=seq_len, max_questions=1,
                         max_new_tokens=max_new_tokens, batch_size=min(batch_size, len(part)))
        for i, a in zip(part, answers):
          out[i] = a
        done += len(part)
        if progress:
          progress(done, len(prompts))
  return out


def make_continuation_scorer(cfg: fusion.FusionConfig
                             ) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, ...]]:
  """Jitted (params, batch) -> ((B,) summed log-prob of the labels, (B,) all labels greedy)."""

  @jax.jit
  def score(params, batch):
    logits, _ = fusion.apply(params, batch, cfg, train=False)
    logits = logits[:, :-1].astype(jnp.float32)
    labels = batch["labels"][:, 1:]
    valid = labels >= 0
    safe = jnp.where(valid, labels, 0)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), safe[..., None], -1)[..., 0]
    greedy = jnp.argmax(logits, -1) == safe
    return (jnp.sum(jnp.where(valid, logp, 0.0), -1), jnp.all(greedy | ~valid, -1))

  return score


def loglikelihood(model: Any, items: Sequence[tuple[str, str, Any]], *, batch_size: int = 8
                  ) -> list[tuple[float, bool] | None]:
  """(log p(continuation | context, image), continuation is the greedy answer) per
  (context, continuation, image); None for a pair that does not fit the model's seq_len.

  The continuation is scored as the model's answer turn: its tokens and the template's end
  token (as lmms-eval's llava scores the answer message), with one full forward (interaction
  layers included), like fusion_jax.eval.closed_qa's candidate scoring.
  """
  cfg, tok = model.cfg, model.tokenizer
  score = make_continuation_scorer(cfg)
  size = cfg.vision.image_size
  out: list[tuple[float, bool] | None] = [None] * len(items)
  with tempfile.TemporaryDirectory() as tmp:
    encs, paths = [], []
    for i, (ctx, cont, im) in enumerate(items):
      path = _image_file(im, tmp, i)
      enc = encode_conversation(_record(ctx, path, i, answer=cont), tok, cfg.template)
      encs.append(enc)
      paths.append(path)
    lengths = [e.length(model.q, cfg.num_image_tokens) for e in encs]
    for seq_len, idx in _buckets(lengths, model.seq_len).items():
      for start in range(0, len(idx), batch_size):
        part = idx[start:start + batch_size]
        rows = []
        for i in part:
          try:
            ex = layout_sample(encs[i], q=model.q, num_image_tokens=cfg.num_image_tokens,
                               seq_len=seq_len, max_questions=1,
                               max_instruct_len=cfg.max_instruct_len, pad_id=tok.pad_id)
          except BadSample as e:
            raise ValueError(f"loglikelihood item {i}: {e}") from e
          ex["images"] = (load_static_hd(paths[i], size, source=f"item {i}") if paths[i]
                          else text_only_images(size))
          rows.append(ex)
        rows += [rows[-1]] * (batch_size - len(rows))
        batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        logp, greedy = jax.device_get(score(model.params, batch))
        for j, i in enumerate(part):
          out[i] = (float(logp[j]), bool(greedy[j]))
  return out
