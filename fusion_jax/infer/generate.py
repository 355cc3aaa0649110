"""FUSION generation: prompts -> fixed-shape batch -> prefill -> KV-cached decode loop.

A prompt is a LLaVA record whose conversation ends with a user turn. It is laid out exactly as
in training (fusion_jax.data.layout, `add_generation_prompt`): right-padded to seq_len, q
latents per question, the last prompt token (the assistant header) as the question position.
`Fusion.prefill` runs the whole prompt, interaction layers included, into a KV cache of
seq_len + max_new_tokens slots; `Fusion.decode` then adds one token per step with the LLM alone
(spec 5: interaction layers never run on single-token decode). The decode loop is a
`lax.while_loop` inside one jitted call that stops once every example has produced a stop
token (the template's end-of-answer token or EOS), so a batch compiles once per (batch size,
seq_len, q, max_new_tokens).

LongRoPE (Phi-3.5): prefill picks its factor set from the prompt's largest position and cached
keys keep it; answers that run past original_max_position_embeddings (4096) would need a
re-prefill as in transformers, which this loop does not do (keep seq_len + max_new_tokens
<= 4096 for Phi models; Llama-3 scaling has no such switch).

Not reproduced from the authors' inference (spec 11): batch > 1 positions computed before
padding, instructions taken from the first question only, random q at inference (q is an
argument here), a context cached across calls.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.data.conversation import encode_conversation, get_template
from fusion_jax.data.images import load_static_hd, text_only_images
from fusion_jax.data.layout import layout_sample
from fusion_jax.data.tokenizer import IMAGE_MARKER, Tokenizer
from fusion_jax.models import fusion
from fusion_jax.models.llm import init_cache


def stop_ids(tokenizer: Tokenizer, template: str) -> tuple[int, ...]:
  """Token ids that end an answer: the template's end token(s) and the tokenizer's EOS."""
  ids = [tokenizer.token_to_id(t) for t in get_template(template).stop_strings]
  ids.append(getattr(tokenizer, "eos_id", None))
  return tuple(sorted({int(i) for i in ids if i is not None and i >= 0}))


def prompt_batch(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer,
                 cfg: fusion.FusionConfig, *, image_root: str, q: int, seq_len: int,
                 max_questions: int) -> dict[str, np.ndarray]:
  """Fixed-shape prompt batch (the fusion.py batch contract) for records ending in a user turn.

  Raises (naming the record): fusion_jax.data.errors.BadSample when a prompt cannot be
  encoded (e.g. it does not end with a user turn); ValueError when its last question does not
  fit seq_len / max_questions.
  """
  rows = []
  for i, rec in enumerate(records):
    source = str(rec.get("id", f"prompt {i}"))
    enc = encode_conversation(rec, tokenizer, cfg.template, source=source,
                              add_generation_prompt=True)
    ex = layout_sample(enc, q=q, num_image_tokens=cfg.num_image_tokens, seq_len=seq_len,
                       max_questions=max_questions, max_instruct_len=cfg.max_instruct_len,
                       pad_id=tokenizer.pad_id, require_labels=False)
    n_real = int(ex["token_mask"].sum())
    last_q = int(ex["question_pos"].max())
    if last_q != n_real - 1:
      raise ValueError(f"{source}: the prompt ({enc.length(q, cfg.num_image_tokens)} positions, "
                       f"{enc.num_questions} questions) does not fit seq_len={seq_len} / "
                       f"max_questions={max_questions}; raise them")
    size = cfg.vision.image_size
    rel = rec.get("image")
    ex["images"] = (load_static_hd(os.path.join(image_root, rel), size, source=source)
                    if rel else text_only_images(size))
    rows.append(ex)
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def make_generate(cfg: fusion.FusionConfig, *, max_new_tokens: int, stop: Sequence[int],
                  pad_id: int, temperature: float = 0.0
                  ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Jitted (params, prompt batch, rng key) -> (tokens (B, max_new_tokens) int32, lengths (B,)).

  tokens[b, :lengths[b]] is example b's answer without its stop token; later entries hold
  pad_id. temperature 0: greedy; otherwise samples from softmax(logits / temperature).
  """
  stop_arr = jnp.asarray(tuple(stop) or (-1,), jnp.int32)

  def pick(logits: jax.Array, key: jax.Array) -> jax.Array:
    if temperature <= 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  @jax.jit
  def generate(params, batch, rng):
    b, s = batch["input_ids"].shape
    prompt_len = jnp.sum(batch["token_mask"], axis=-1).astype(jnp.int32)  # (B,)
    cache = init_cache(cfg.llm, b, s + max_new_tokens)
    logits, cache = fusion.prefill(params, batch, cfg, cache)
    last = jnp.take_along_axis(logits, (prompt_len - 1)[:, None, None], axis=1)[:, 0]  # (B, V)
    tokens = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = jnp.zeros((b,), jnp.bool_)

    def cond(state):
      t, _, _, done, _, _, _ = state
      return (t < max_new_tokens) & ~jnp.all(done)

    def body(state):
      t, tokens, lengths, done, last, cache, rng = state
      rng, key = jax.random.split(rng)
      nxt = pick(last, key)
      stopped = jnp.isin(nxt, stop_arr)
      tokens = tokens.at[:, t].set(jnp.where(done | stopped, pad_id, nxt))
      lengths = lengths + (~done & ~stopped).astype(jnp.int32)
      done = done | stopped
      logits, cache = fusion.decode(params, nxt[:, None], (prompt_len + t)[:, None], cfg, cache)
      return t + 1, tokens, lengths, done, logits[:, 0], cache, rng

    state = (jnp.int32(0), tokens, lengths, done, last, cache, rng)
    _, tokens, lengths, _, _, _, _ = jax.lax.while_loop(cond, body, state)
    return tokens, lengths

  return generate


def answer(params: Any, cfg: fusion.FusionConfig, tokenizer: Tokenizer,
           records: Sequence[Mapping[str, Any]], *, image_root: str = "", q: int | None = None,
           seq_len: int = 256, max_questions: int = 4, max_new_tokens: int = 64,
           temperature: float = 0.0, seed: int = 0, batch_size: int = 8) -> list[str]:
  """The model's answer (decoded text) to the last user turn of each record.

  Batches are padded to `batch_size` by repeating the last prompt, so every batch has one
  shape. q defaults to the largest of cfg.query_len (the evaluation default).
  """
  q = int(q or max(cfg.query_len))
  gen = make_generate(cfg, max_new_tokens=max_new_tokens, stop=stop_ids(tokenizer, cfg.template),
                      pad_id=tokenizer.pad_id, temperature=temperature)
  out: list[str] = []
  rng = jax.random.key(seed)
  for start in range(0, len(records), batch_size):
    chunk = list(records[start:start + batch_size])
    n = len(chunk)
    chunk += [chunk[-1]] * (batch_size - n)
    batch = prompt_batch(chunk, tokenizer, cfg, image_root=image_root, q=q, seq_len=seq_len,
                         max_questions=max_questions)
    rng, key = jax.random.split(rng)
    tokens, lengths = jax.device_get(gen(params, batch, key))
    out += [tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True).strip()
            for i in range(n)]
  return out


def first_questions(records: Sequence[Mapping[str, Any]], num: int
                    ) -> tuple[list[dict[str, Any]], list[str]]:
  """(prompts, reference answers): each record cut after its first user turn, at most `num`."""
  prompts, refs = [], []
  for rec in records:
    conv = rec.get("conversations") or []
    if len(conv) < 2 or conv[0].get("from") not in ("human", "user"):
      continue
    prompts.append({**rec, "conversations": conv[:1]})
    refs.append(str(conv[1].get("value", "")))
    if len(prompts) == num:
      break
  return prompts, refs


def question_text(prompt: Mapping[str, Any]) -> str:
  """The last user turn of a prompt record, without the image marker."""
  return prompt["conversations"][-1]["value"].replace(IMAGE_MARKER, "").strip()


def answer_model(model: Any, prompts: Sequence[Mapping[str, Any]], *, image_root: str | None = None,
                 q: int = 0, **kw: Any) -> list[str]:
  """`answer` with a loaded model (fusion_jax.infer.load.LoadedModel): its weights, tokenizer
  and prompt layout (seq_len, max_questions, q unless q > 0, image_root unless given)."""
  kw.setdefault("batch_size", min(8, len(prompts)))
  return answer(model.params, model.cfg, model.tokenizer, prompts,
                image_root=model.image_root if image_root is None else image_root,
                q=q or model.q, seq_len=model.seq_len, max_questions=model.max_questions, **kw)


def answer_run(workdir: str, prompts: Sequence[Mapping[str, Any]], *, image_root: str,
               step: int | None = None, q: int = 0, dtype: str | None = None, **kw: Any
               ) -> tuple[list[str], int | None]:
  """`answer_model` on the model at `workdir` (a training run's newest or `step` checkpoint, or
  a model dir; fusion_jax.infer.load). Returns (answers, step; None for a model dir)."""
  from fusion_jax.infer.load import load_model
  model = load_model(workdir, step=step, dtype=dtype)
  return answer_model(model, prompts, image_root=image_root, q=q, **kw), model.step
