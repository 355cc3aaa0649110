"""The tokenizer and a tiny Phi-3 LM pretrained on synthesized text in the chat template.

Text (`chat_texts`): each scene's caption followed by its questions, answered by the assistant
(phi_3 template), so the LM learns the answer vocabulary and to read answers off a
description; plus the captions alone as "describe" answers. The tokenizer is trained on the
same text with the Phi-3 chat tokens as added tokens (no vision tokens: import_hf's
`<vision_start>` / `<vision_end>` are appended on load, as for a real base LLM).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fusion_jax.convert.hf_llm import llm_tensors_to_torch
from fusion_jax.convert.safetensors_io import write_safetensors
from fusion_jax.data.conversation import get_template
from fusion_jax.data.tokenizer import PHI3_CHAT_TOKENS, TEMPLATE_PAD_TOKENS, Tokenizer, load_tokenizer
from fusion_jax.data.tokenizer_train import train_sentencepiece
from fusion_jax.models.llm import Decoder
from fusion_jax.models.llm_config import LLMConfig
from fusion_jax.pretrain.pairs import Item

DESCRIBE = "Describe the image."


def chat_texts(items: Sequence[Item], template: str = "phi_3") -> list[str]:
  """Two chat-template texts per item: caption + its QA turns, and 'describe' -> caption."""
  tpl = get_template(template)
  out = []
  for it in items:
    qa = "".join(
        tpl.user_header + (f"{it.caption}\n{q}" if i == 0 else q) + tpl.user_end
        + tpl.assistant_header + a + tpl.assistant_end for i, (q, a) in enumerate(it.qa))
    out.append(tpl.system_block + qa)
    out.append(tpl.system_block + tpl.user_header + DESCRIBE + tpl.user_end
               + tpl.assistant_header + it.caption + tpl.assistant_end)
  return out


def train_tokenizer(items: Sequence[Item], out_dir: str, vocab_size: int) -> Tokenizer:
  """Sentencepiece (Phi-3.5 style, chat tokens added, no vision tokens) in out_dir."""
  texts = [it.caption for it in items] + [s for it in items for qa in it.qa for s in qa]
  tmp = os.path.join(out_dir, "_tok")
  train_sentencepiece(texts, os.path.join(tmp, "tokenizer"), vocab_size,
                      added_tokens=PHI3_CHAT_TOKENS)
  for name in os.listdir(tmp):
    shutil.move(os.path.join(tmp, name), os.path.join(out_dir, name))
  os.rmdir(tmp)
  return load_tokenizer(out_dir, pad_token=TEMPLATE_PAD_TOKENS["phi_3"])


def pad_rows(seqs: Sequence[Sequence[int]], pad_id: int, seq_len: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
  """Token id lists -> (N, T) int32 ids padded with pad_id and their (N, T) validity mask;
  T = seq_len (longer lists are cut) or the longest list (at least 1)."""
  t = seq_len if seq_len is not None else max(1, max((len(x) for x in seqs), default=0))
  ids = np.full((len(seqs), t), pad_id, np.int32)
  mask = np.zeros((len(seqs), t), bool)
  for i, x in enumerate(seqs):
    x = list(x)[:t]
    ids[i, :len(x)], mask[i, :len(x)] = x, True
  return ids, mask


def pack_ids(texts: Sequence[str], tok: Tokenizer, seq_len: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """Each text -> one row of seq_len ids (cut / padded) and its validity mask."""
  return pad_rows([tok.encode(t) for t in texts], pad_id, seq_len)


def train_lm(cfg: LLMConfig, ids: np.ndarray, mask: np.ndarray, *, steps: int, batch: int = 32,
             lr: float = 2e-3, seed: int = 0, log: Callable[[str], None] = print
             ) -> tuple[dict[str, Any], list[float]]:
  """Next-token cross entropy on every valid token; returns (Decoder params, losses)."""
  model = Decoder(cfg)
  t = ids.shape[1]
  pos = np.broadcast_to(np.arange(t, dtype=np.int32), (batch, t))
  params = model.init(jax.random.key(seed), ids[:batch], pos, mask[:batch],
                      method=Decoder.forward)["params"]
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, lr * 0.05)
  opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  state = opt.init(params)

  @jax.jit
  def step(params, state, x, m):
    def loss_fn(p):
      logits, _ = model.apply({"params": p}, x, pos, m, method=Decoder.forward)
      ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:])
      w = (m[:, 1:] & m[:, :-1]).astype(jnp.float32)
      return jnp.sum(ce * w) / jnp.maximum(jnp.sum(w), 1.0)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  n = ids.shape[0]
  losses: list[float] = []
  t0 = time.time()
  for i in range(steps):
    idx = np.sort(rng.choice(n, batch, replace=False))
    params, state, loss = step(params, state, ids[idx], mask[idx])
    losses.append(float(loss))
    if (i + 1) % max(1, steps // 10) == 0 or i == 0:
      log(f"lm step {i + 1}/{steps}: loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)")
  return jax.tree.map(np.asarray, params), losses


def save_phi3(out_dir: str, cfg: LLMConfig, params: dict[str, Any]) -> None:
  """Phi3ForCausalLM directory: config.json + model.safetensors (tokenizer written before)."""
  os.makedirs(out_dir, exist_ok=True)
  hf = {**cfg.to_hf(), "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32"}
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  write_safetensors(out_dir, llm_tensors_to_torch(params, cfg))
