"""Shared fixtures of the benchmark tests: base64 PNGs, VLMEvalKit TSVs, a tiny model dir."""
from __future__ import annotations

import base64
import csv
import dataclasses
import io
import os
import shutil

from PIL import Image

MMB_COLS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image",
            "l2-category", "split"]


def png_b64(color=(200, 10, 10), size=(24, 16)) -> str:
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, "PNG")
  return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows, columns):
  """A VLMEvalKit-layout TSV (tab-separated, header row) of dict rows."""
  with open(path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=columns, delimiter="\t")
    w.writeheader()
    for r in rows:
      w.writerow({c: r.get(c, "") for c in columns})
  return path


def tiny_model_dir(root: str) -> str:
  """A random TINY FUSION model dir (phi_3 template) with its tokenizer, under root/model."""
  import flax.linen as nn
  import jax

  from fusion_jax.convert.model_dir import TOKENIZER_NAME, save_model_dir
  from fusion_jax.models import fusion
  from fusion_jax.models.presets import TINY
  from tests.pipeline_fixtures import make_tokenizer
  tok = make_tokenizer(root)
  cfg = dataclasses.replace(TINY, llm=TINY.llm.replace(vocab_size=len(tok), pad_token_id=tok.pad_id,
                                                       initializer_range=0.5),
                            template="phi_3")
  batch = fusion.example_batch(cfg, batch_size=1, seq_len=64, max_questions=1, q=4)
  # jitted: the persistent compile cache then makes every later init a few seconds
  params = nn.meta.unbox(jax.jit(lambda k: fusion.init(k, cfg, batch)["params"])(jax.random.key(0)))
  out = os.path.join(root, "model")
  save_model_dir(out, params, cfg)
  shutil.copytree(os.path.join(root, "tok"), os.path.join(out, TOKENIZER_NAME))
  return out
