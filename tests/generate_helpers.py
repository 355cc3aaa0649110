"""Generation helpers for the tests: a whole prompt batch at once and a single-setting jitted
generate (the library's Generator does per-row settings, stop strings and shape buckets)."""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.data.tokenizer import Tokenizer
from fusion_jax.infer import generator
from fusion_jax.models import batch_spec, fusion


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
    enc, _ = generator.encode_prompt(rec, tokenizer, cfg, q=q, index=i)
    rows.append(generator.layout_prompt(rec, enc, tokenizer, cfg, image_root=image_root, q=q,
                                         seq_len=seq_len, max_questions=max_questions))
  return batch_spec.stack_examples(rows)


def make_generate(cfg: fusion.FusionConfig, *, max_new_tokens: int, stop: Sequence[int],
                  pad_id: int, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0
                  ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """Jitted (params, prompt batch, rng key) -> (tokens (B, max_new_tokens) int32, lengths (B,)).

  One setting for every row, token stops only (Generator does per-row settings, stop strings
  and shape buckets). tokens[b, :lengths[b]] is row b's answer without its stop token.
  """

  @jax.jit
  def generate(params, batch, rng):
    b = batch["input_ids"].shape[0]
    sampling = dict(temperature=jnp.full((b,), temperature, jnp.float32),
                    top_p=jnp.full((b,), top_p, jnp.float32),
                    top_k=jnp.full((b,), top_k, jnp.int32),
                    max_new=jnp.full((b,), max_new_tokens, jnp.int32))
    state = generator.init_state(params, batch, cfg, max_new_tokens=max_new_tokens,
                                 pad_id=pad_id, sampling=sampling, keys=jax.random.split(rng, b))
    state = generator.decode_steps(params, state, jnp.int32(max_new_tokens), cfg, stop=stop,
                                   pad_id=pad_id)
    return state["tokens"], state["lengths"]

  return generate
