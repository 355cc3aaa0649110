"""Answers to prompts in one call: `answer` (params, config, tokenizer), `answer_model` (a
loaded model), `answer_run` (a workdir or model dir), and the helpers that turn held-out
records into prompts (`first_questions`, `question_text`). Batching, shape buckets and the
decode loop: fusion_jax/infer/generator.py; sampling and stops: fusion_jax/infer/sampling.py.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fusion_jax.data.tokenizer import IMAGE_MARKER, Tokenizer
from fusion_jax.infer.generator import Generator
from fusion_jax.infer.sampling import SamplingParams
from fusion_jax.models import fusion, query_len


def answer(params: Any, cfg: fusion.FusionConfig, tokenizer: Tokenizer,
           records: Sequence[Mapping[str, Any]], *, image_root: str = "", q: int | None = None,
           seq_len: int = 256, max_questions: int = 4, max_new_tokens: int = 64,
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           stop: Sequence[str] = (), seed: int = 0, batch_size: int = 8) -> list[str]:
  """The model's answer (decoded text) to the last user turn of each record.

  Batches hold up to `batch_size` prompts (shapes bucketed, see Generator). q defaults to the
  largest of cfg.query_len (the evaluation default); seq_len caps the prompt layout.
  """
  gen = Generator(params, cfg, tokenizer, q=query_len.eval_q(cfg.query_len, q),
                  max_questions=max_questions, max_seq_len=seq_len, max_batch=batch_size,
                  max_new_tokens=max(max_new_tokens, 1))
  sp = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                      top_k=top_k, stop=tuple(stop))
  return [c.text for c in gen.generate(records, sp, image_root=image_root, seed=seed)]


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
