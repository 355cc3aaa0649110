"""The batched FUSION generator: prompts -> bucketed batch -> prefill -> KV-cached decode loop.

A prompt is a LLaVA record whose conversation ends with a user turn (optionally with a
"system" text, and "images" already decoded to static_hd crops (5, H, W, 3) uint8 instead of
an image path). It is laid out exactly as in training (fusion_jax.data.layout,
`add_generation_prompt`): right-padded, q latents per question, the last prompt token (the
assistant header) as the question position. `Fusion.prefill` runs the whole prompt,
interaction layers included, into a KV cache of S + T slots; `Fusion.decode` then adds one
token per step with the LLM alone (docs/model.md §7: interaction layers never run on single-token
decode). Decoding is a `lax.while_loop` inside one jitted call that stops once every row is
done (stop token, its own max_new_tokens, or a stop string).

Prompts of different lengths share a batch: each row's cache slots, positions and length are
its own, so a row's greedy answer is the one it gets alone (tested). Per row: max_new_tokens,
temperature (0 = greedy), top_k (0 = off), top_p (1 = off), stop strings, seed (how a token is
picked and where an answer ends: fusion_jax/infer/sampling.py).

Shapes are bucketed so compiles stay bounded (`Generator`): batch size to a power of two
<= max_batch (padded with finished dummy rows), prompt length S to a power of two >= 64 (capped
at the model's seq_len), new tokens T to a power of two >= 16; one prefill and one decode
compile per (B, S, T). Stop strings are checked on the host every `stop_check_every` tokens
(the text is then cut at the first occurrence), so a batch without stop strings decodes in one
call.

LongRoPE (Phi-3.5): transformers picks the short or long factor set for a whole forward from
its largest position, and recomputes the cache when generation crosses
original_max_position_embeddings (keys cached with the short rotation would otherwise stay
wrong; Phi3ForCausalLM.prepare_inputs_for_generation). So does this generator: a prompt whose
answer may cross the switch runs as its own batch and, at the step whose token would sit at
position original_max_position_embeddings, the prompt and every token generated so far are
prefilled again (interaction layers included) with the long factors; decoding goes on from that
cache. Prompts already past the switch are batched only with each other, the rest only with
each other, so no row's regime depends on its batch. Llama-3 scaling has no such switch.

Not reproduced from the authors' inference (docs/model.md §12): batch > 1 positions computed before
padding, instructions taken from the first question only, random q at inference (q is an
argument here), a context cached across calls.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.data.conversation import EncodedSample, encode_conversation
from fusion_jax.data.images import record_images
from fusion_jax.data.layout import layout_sample
from fusion_jax.data.tokenizer import Tokenizer
from fusion_jax.infer.sampling import (SamplingParams, answer_text, cut_at_stop, sample_tokens,
                                       stop_ids)
from fusion_jax.models import batch_spec, fusion
from fusion_jax.models.llm import init_cache, rope_tables
from fusion_jax.models.rope import longrope_is_long

MIN_SEQ_BUCKET = 64
MIN_NEW_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class Completion:
  """One answer. finish_reason: 'stop' (stop token or stop string) or 'length'.
  prompt_tokens: the prompt's positions (image and latent slots included); completion_tokens:
  generated tokens up to the end of the answer (the stop token or string included)."""
  text: str
  token_ids: tuple[int, ...]
  prompt_tokens: int
  completion_tokens: int
  finish_reason: str


# ----------------------------------------------------------------------------- prompts


def encode_prompt(rec: Mapping[str, Any], tokenizer: Tokenizer, cfg: fusion.FusionConfig, *,
                  q: int, index: int = 0) -> tuple[EncodedSample, int]:
  """(encoded prompt, its length in positions) of a record ending in a user turn.

  Raises fusion_jax.data.errors.BadSample naming the record when it cannot be encoded.
  """
  source = str(rec.get("id", f"prompt {index}"))
  record = rec
  if rec.get("images") is not None and not rec.get("image"):
    record = {**rec, "image": "<decoded>"}  # the marker logic only needs to know there is one
  enc = encode_conversation(record, tokenizer, cfg.template, source=source,
                            system=rec.get("system"), add_generation_prompt=True)
  return enc, enc.length(q, cfg.num_image_tokens)


def layout_prompt(rec: Mapping[str, Any], enc: EncodedSample, tokenizer: Tokenizer,
                  cfg: fusion.FusionConfig, *, image_root: str, q: int, seq_len: int,
                  max_questions: int) -> dict[str, np.ndarray]:
  """One prompt example (batch_spec's per-sample form, (seq_len,) rows) with its images
  (images.record_images); ValueError naming the prompt when its last question does not fit
  seq_len / max_questions."""
  ex = layout_sample(enc, q=q, num_image_tokens=cfg.num_image_tokens, seq_len=seq_len,
                     max_questions=max_questions, max_instruct_len=cfg.max_instruct_len,
                     pad_id=tokenizer.pad_id, require_labels=False)
  n_real = int(ex["token_mask"].sum())
  last_q = int(ex["question_pos"].max())
  if last_q != n_real - 1:
    raise ValueError(f"{enc.source}: the prompt ({enc.length(q, cfg.num_image_tokens)} "
                     f"positions, {enc.num_questions} questions) does not fit seq_len={seq_len} "
                     f"/ max_questions={max_questions}; raise them")
  ex["images"] = record_images(rec, cfg.vision.image_size, image_root=image_root,
                               source=enc.source)
  return ex


# ----------------------------------------------------------------------------- device side


def init_state(params: Any, batch: Mapping[str, jax.Array], cfg: fusion.FusionConfig, *,
               max_new_tokens: int, pad_id: int, sampling: Mapping[str, jax.Array],
               keys: jax.Array) -> dict[str, Any]:
  """Prefill: the decode state after the prompt (traceable; shapes fixed by the batch and
  max_new_tokens = T).

  sampling: per-row arrays temperature (B,) f32, top_p (B,) f32, top_k (B,) i32, max_new (B,)
  i32 (each row's own limit, <= T). keys: (B,) PRNG keys.
  """
  b, s = batch["input_ids"].shape
  prompt_len = jnp.sum(batch["token_mask"], axis=-1).astype(jnp.int32)  # (B,)
  cache = init_cache(cfg.llm, b, s + max_new_tokens)
  last, cache = fusion.prefill(params, batch, cfg, cache, logits_at=prompt_len - 1)  # (B, V)
  return dict(t=jnp.int32(0), tokens=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
              lengths=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), jnp.bool_),
              stopped=jnp.zeros((b,), jnp.bool_), last=last.astype(jnp.float32), cache=cache,
              keys=keys, prompt_len=prompt_len, **{k: jnp.asarray(v) for k, v in sampling.items()})


def pick_step(state: dict[str, Any], *, stop: Sequence[int], pad_id: int
              ) -> tuple[dict[str, Any], jax.Array]:
  """Step t's token of every row from state['last'] (traceable): records it, advances t, marks
  rows done; returns (state, next token ids (B,)). The token is not yet fed to the model."""
  stop_arr = jnp.asarray(tuple(stop) or (-1,), jnp.int32)
  t = state["t"]
  step_keys = jax.vmap(lambda k: jax.random.fold_in(k, t))(state["keys"])
  nxt = sample_tokens(state["last"], state["temperature"], state["top_k"], state["top_p"],
                      step_keys)
  hit = jnp.isin(nxt, stop_arr) & ~state["done"]
  emit = ~state["done"] & ~hit
  lengths = state["lengths"] + emit.astype(jnp.int32)
  return {**state, "t": t + 1,
          "tokens": state["tokens"].at[:, t].set(jnp.where(emit, nxt, pad_id)),
          "lengths": lengths, "done": state["done"] | hit | (lengths >= state["max_new"]),
          "stopped": state["stopped"] | hit}, nxt


def decode_steps(params: Any, state: dict[str, Any], t_stop: jax.Array,
                 cfg: fusion.FusionConfig, *, stop: Sequence[int], pad_id: int
                 ) -> dict[str, Any]:
  """Decode from state['t'] until t_stop (<= T) or every row is done (traceable).

  tokens[b, :lengths[b]] is row b's answer without its stop token; later entries hold pad_id.
  A done row keeps being fed (the batch has one shape) at a position that no longer grows, so
  it never moves another row's LongRoPE regime.
  """
  t_max = state["tokens"].shape[1]

  def cond(st):
    return (st["t"] < jnp.minimum(t_stop, t_max)) & ~jnp.all(st["done"])

  def body(st):
    t = st["t"]
    st, nxt = pick_step(st, stop=stop, pad_id=pad_id)
    pos = st["prompt_len"] + jnp.minimum(t, st["max_new"] - 1)
    logits, cache = fusion.decode(params, nxt[:, None], pos[:, None], cfg, st["cache"])
    return {**st, "last": logits[:, 0].astype(jnp.float32), "cache": cache}

  return jax.lax.while_loop(cond, body, state)


def reprefill(params: Any, batch: Mapping[str, jax.Array], state: dict[str, Any],
              cfg: fusion.FusionConfig) -> dict[str, Any]:
  """LongRoPE crossing (traceable): the whole sequence so far (prompt + generated tokens, laid
  out in `batch` with S' = the cache length) recomputed into a fresh cache, as transformers does
  once a sequence outgrows original_max_position_embeddings; its largest position selects the
  long factors. Returns state with the new cache and next-token logits."""
  b, s = batch["input_ids"].shape
  n = jnp.sum(batch["token_mask"], axis=-1).astype(jnp.int32)
  last, cache = fusion.prefill(params, batch, cfg, init_cache(cfg.llm, b, s), logits_at=n - 1)
  return {**state, "cache": cache, "last": last.astype(jnp.float32)}


def _row_keys(seeds: Sequence[int]) -> jax.Array:
  return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))


# ----------------------------------------------------------------------------- host side


def _bucket(n: int, smallest: int, cap: int) -> int:
  """The smallest power of two >= max(n, smallest), at most cap (n <= cap)."""
  b = smallest
  while b < n:
    b *= 2
  return min(b, cap)


@dataclasses.dataclass
class _Row:
  index: int
  rec: Mapping[str, Any]
  enc: EncodedSample
  length: int
  sampling: SamplingParams
  seed: int


class Generator:
  """Generation for one model with bounded compiles (see the module docstring).

  Args:
    params, cfg, tokenizer: the model (fusion_jax.infer.load.LoadedModel has all three).
    q: latent tokens per question; max_questions: user turns with latent slots.
    max_seq_len: longest prompt layout (positions); max_batch: rows per device batch;
    max_new_tokens: the largest allowed per-prompt limit; stop_check_every: tokens decoded
    between host checks of stop strings; stop: token ids that end an answer (default: the
    template's end token and EOS).
  """

  def __init__(self, params: Any, cfg: fusion.FusionConfig, tokenizer: Tokenizer, *, q: int,
               max_questions: int, max_seq_len: int, max_batch: int = 8,
               max_new_tokens: int = 512, stop_check_every: int = 16,
               stop: Sequence[int] | None = None):
    self.params, self.cfg, self.tokenizer = params, cfg, tokenizer
    self.q, self.max_questions, self.max_seq_len = int(q), int(max_questions), int(max_seq_len)
    self.max_batch, self.max_new_tokens = int(max_batch), int(max_new_tokens)
    self.stop_check_every = int(stop_check_every)
    self.stop = tuple(stop_ids(tokenizer, cfg.template) if stop is None else stop)
    self._rope = rope_tables(cfg.llm)
    pad = tokenizer.pad_id
    self._prefill = jax.jit(
        functools.partial(init_state, cfg=cfg, pad_id=pad), static_argnames=("max_new_tokens",))
    self._decode = jax.jit(functools.partial(decode_steps, cfg=cfg, stop=self.stop, pad_id=pad),
                           donate_argnums=(1,))
    self._pick = jax.jit(functools.partial(pick_step, stop=self.stop, pad_id=pad))
    self._reprefill = jax.jit(functools.partial(reprefill, cfg=cfg))

  @classmethod
  def for_model(cls, model: Any, **kw: Any) -> Generator:
    """A Generator with a LoadedModel's weights, tokenizer and prompt layout."""
    return cls(model.params, model.cfg, model.tokenizer, q=model.q,
               max_questions=model.max_questions, max_seq_len=model.seq_len, **kw)

  def check(self, rec: Mapping[str, Any], sampling: SamplingParams, index: int = 0
            ) -> tuple[EncodedSample, int]:
    """Validates one prompt against this generator's limits; returns (encoded, length).

    Raises BadSample (bad conversation) or ValueError (too long, max_new_tokens too large),
    each naming the prompt.
    """
    enc, n = encode_prompt(rec, self.tokenizer, self.cfg, q=self.q, index=index)
    if sampling.max_new_tokens > self.max_new_tokens:
      raise ValueError(f"{enc.source}: max_new_tokens {sampling.max_new_tokens} exceeds this "
                       f"server's limit {self.max_new_tokens}")
    if enc.num_questions > self.max_questions:
      raise ValueError(f"{enc.source}: {enc.num_questions} user turns; at most "
                       f"{self.max_questions} get latent tokens (max_questions)")
    if n > self.max_seq_len:
      raise ValueError(f"{enc.source}: the prompt takes {n} positions (image and latent slots "
                       f"included); the limit is {self.max_seq_len} (seq_len; --seq_len raises "
                       f"it up to {self.cfg.llm.max_position_embeddings})")
    end = n + sampling.max_new_tokens
    if end > self.cfg.llm.max_position_embeddings:
      raise ValueError(f"{enc.source}: prompt ({n} positions) + max_new_tokens "
                       f"{sampling.max_new_tokens} exceeds max_position_embeddings "
                       f"{self.cfg.llm.max_position_embeddings}")
    return enc, n

  def crossing(self, length: int, max_new_tokens: int) -> int | None:
    """The decode step at which a prompt of `length` positions crosses LongRoPE's switch to
    the long factors (its re-prefill step), or None when it stays in one regime."""
    if longrope_is_long(self._rope, length - 1):
      return None  # the prompt itself is long: every step is
    if not longrope_is_long(self._rope, length + max_new_tokens - 1):
      return None
    return self._rope.switch_at - length

  def generate(self, records: Sequence[Mapping[str, Any]],
               sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams(), *,
               image_root: str = "", seed: int = 0,
               on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    """Completions for `records` (in order), batched by LongRoPE regime and max_batch; a
    prompt whose answer may cross the switch runs alone (its re-prefill is its own).

    on_text(index, decoded): streaming; called every `stop_check_every` decoded tokens with
    each unfinished prompt's answer so far (decoded, not yet cut or stripped: see
    sampling.TextStream). The completions are the same with or without it.
    """
    if isinstance(sampling, SamplingParams):
      sampling = [sampling] * len(records)
    if len(sampling) != len(records):
      raise ValueError(f"{len(records)} prompts but {len(sampling)} sampling settings")
    rows = []
    for i, (rec, sp) in enumerate(zip(records, sampling)):
      enc, n = self.check(rec, sp, i)
      row_seed = sp.seed if sp.seed is not None else (seed * 1_000_003 + i) % 2**32
      rows.append(_Row(i, rec, enc, n, sp, int(row_seed) % 2**32))
    out: list[Completion | None] = [None] * len(rows)
    crossing = [r for r in rows if self.crossing(r.length, r.sampling.max_new_tokens) is not None]
    alone = {r.index for r in crossing}
    groups = [[r for r in rows if r.index not in alone
               and longrope_is_long(self._rope, r.length - 1) == long] for long in (False, True)]
    batches = [g[i:i + self.max_batch] for g in groups for i in range(0, len(g), self.max_batch)]
    for chunk in batches + [[r] for r in crossing]:
      for r, c in zip(chunk, self._run(chunk, image_root, on_text)):
        out[r.index] = c
    return out  # type: ignore[return-value]

  def _run(self, rows: Sequence[_Row], image_root: str,
           on_text: Callable[[int, str], None] | None = None) -> list[Completion]:
    n = len(rows)
    b = _bucket(n, 1, self.max_batch)
    s = _bucket(max(r.length for r in rows), MIN_SEQ_BUCKET, self.max_seq_len)
    t = _bucket(max(r.sampling.max_new_tokens for r in rows), MIN_NEW_BUCKET,
                self.max_new_tokens)
    exs = [layout_prompt(r.rec, r.enc, self.tokenizer, self.cfg, image_root=image_root,
                         q=self.q, seq_len=s, max_questions=self.max_questions) for r in rows]
    exs += [exs[0]] * (b - n)  # dummy rows: finished after one token
    batch = batch_spec.stack_examples(exs)
    sps = [r.sampling for r in rows] + [SamplingParams(max_new_tokens=1)] * (b - n)
    sampling = dict(temperature=np.asarray([p.temperature for p in sps], np.float32),
                    top_p=np.asarray([p.top_p for p in sps], np.float32),
                    top_k=np.asarray([p.top_k for p in sps], np.int32),
                    max_new=np.asarray([p.max_new_tokens for p in sps], np.int32))
    keys = _row_keys([r.seed for r in rows] + [0] * (b - n))
    state = self._prefill(self.params, batch, max_new_tokens=t, sampling=sampling, keys=keys)
    stops = [r.sampling.stop for r in rows]
    check = any(stops) or on_text is not None  # the host looks at the text between calls
    step = self.stop_check_every if check else t
    cross = self.crossing(rows[0].length, rows[0].sampling.max_new_tokens) if n == 1 else None
    t_done = 0
    while True:
      target = min(t, t_done + step)
      if cross is not None and t_done <= cross < target:
        target = cross
      state = self._decode(self.params, state, jnp.int32(target))
      t_done = target
      if cross is not None and t_done == cross and not bool(state["done"][0]):
        state = self._cross(rows[0], state, image_root, s + t)
        t_done += 1
      elif not check and t_done >= t:
        break
      tokens, lengths, done = jax.device_get((state["tokens"], state["lengths"], state["done"]))
      done = np.array(done)
      for i in range(n):
        if done[i] or not (stops[i] or on_text):
          continue
        text = self.tokenizer.decode(tokens[i, :lengths[i]].tolist(), skip_special_tokens=True)
        if stops[i] and cut_at_stop(text, stops[i])[1]:
          done[i] = True
        if on_text is not None:
          on_text(rows[i].index, text)
      if done.all() or t_done >= t:
        break
      # Put back where the decode left it: an uncommitted array would compile the decode again.
      state = {**state, "done": jax.device_put(done, state["done"].sharding)}
    tokens, lengths, stopped = jax.device_get((state["tokens"], state["lengths"],
                                               state["stopped"]))
    return [self._completion(rows[i], tokens[i, :lengths[i]].tolist(), bool(stopped[i]))
            for i in range(n)]

  def _cross(self, row: _Row, state: dict[str, Any], image_root: str, cache_len: int
             ) -> dict[str, Any]:
    """Crossing step of a lone row: its token from the short-regime logits, then the prompt and
    every generated token re-prefilled (long factors) into a fresh cache of the same length."""
    state, _ = self._pick(state)
    if bool(state["done"][0]):
      return state
    k = int(state["t"])
    ids = np.asarray(jax.device_get(state["tokens"][0, :k]))
    ex = layout_prompt(row.rec, row.enc, self.tokenizer, self.cfg, image_root=image_root,
                       q=self.q, seq_len=cache_len, max_questions=self.max_questions)
    n = row.length
    ex["input_ids"][n:n + k] = ids
    ex["token_mask"][n:n + k] = True
    ex["positions"][n:n + k] = np.arange(n, n + k)
    return self._reprefill(self.params, batch_spec.stack_examples([ex]), state)

  def _completion(self, row: _Row, ids: list[int], stopped: bool) -> Completion:
    decode = functools.partial(self.tokenizer.decode, skip_special_tokens=True)
    full = decode(ids)
    hit = cut_at_stop(full, row.sampling.stop)[1]
    used = len(ids) + int(stopped)
    if hit:  # the tokens up to the one that completes the stop string
      used = next(k for k in range(1, len(ids) + 1)
                  if cut_at_stop(decode(ids[:k]), row.sampling.stop)[1])
      ids = ids[:used]
    return Completion(text=answer_text(full, row.sampling.stop), token_ids=tuple(ids),
                      prompt_tokens=row.length, completion_tokens=used,
                      finish_reason="stop" if (stopped or hit) else "length")
