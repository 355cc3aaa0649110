"""Tiny FUSION models on disk for the loader / generation / server tests: a model dir (as
import_torch writes it) and a training workdir (as the trainer writes it)."""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil

import flax.linen as nn
import jax
import optax

from fusion_jax.convert.model_dir import TOKENIZER_NAME, save_model_dir
from fusion_jax.models import fusion
from fusion_jax.models.presets import TINY
from tests.pipeline_fixtures import make_tokenizer


def tiny_config(tok, **llm_overrides) -> fusion.FusionConfig:
  """TINY with the test tokenizer's vocabulary, the Phi-3 template and large random weights
  (so that different prompts give different answers)."""
  llm = TINY.llm.replace(vocab_size=len(tok), pad_token_id=tok.pad_id, initializer_range=0.5,
                         **llm_overrides)
  return dataclasses.replace(TINY, llm=llm, template="phi_3")


@functools.lru_cache(maxsize=8)
def _init_fn(cfg: fusion.FusionConfig):
  batch = fusion.example_batch(cfg, batch_size=1, seq_len=64, max_questions=1,
                               q=min(cfg.query_len), seed=None)
  return jax.jit(lambda key: nn.meta.unbox(fusion.init(key, cfg, batch)["params"]))


def tiny_params(cfg: fusion.FusionConfig, seed: int = 0):
  return _init_fn(cfg)(jax.random.key(seed))


def make_model_dir(root: str, name: str = "fusion_tiny", **llm_overrides):
  """A model dir with the test tokenizer in tokenizer/; returns (path, cfg, params)."""
  tok = make_tokenizer(root)
  cfg = tiny_config(tok, **llm_overrides)
  params = tiny_params(cfg)
  path = os.path.join(root, name)
  save_model_dir(path, params, cfg, extra_meta={"converted_by": "tests"})
  shutil.copytree(os.path.join(root, "tok"), os.path.join(path, TOKENIZER_NAME))
  return path, cfg, params


def make_workdir(root: str, steps=(2, 5), *, seq_len: int = 128, max_questions: int = 2):
  """A training workdir with one checkpoint per step (params from seed = step); returns
  (workdir, {step: params})."""
  from fusion_jax.train import checkpoint as ckpt_lib
  from fusion_jax.train.state import create_state
  tok = make_tokenizer(root)
  workdir = os.path.join(root, "run")
  config = {
      "task": "fusion", "compute_dtype": "float32",
      "model": {"preset": "tiny", "overrides": {
          "template": "phi_3", "llm": {"vocab_size": len(tok), "pad_token_id": tok.pad_id,
                                       "initializer_range": 0.5}}},
      "data": {"tokenizer": os.path.join(root, "tok"), "seq_len": seq_len,
               "max_questions": max_questions, "eval_q": 1, "image_root": root,
               "paths": [os.path.join(root, "train.json")]}}
  cfg = tiny_config(tok)
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), keep_last=0, async_save=False)
  saved = {}
  for step in steps:
    params = tiny_params(cfg, seed=step)
    ck.save(create_state(params, optax.sgd(0.1), jax.random.key(0)), step=step, config=config)
    saved[step] = params
  ck.close()
  return workdir, saved
