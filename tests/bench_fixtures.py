"""Shared fixtures of the benchmark tests: base64 PNGs, VLMEvalKit TSVs, a tiny model dir."""
from __future__ import annotations

import base64
import csv
import io

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
  """A random TINY FUSION model dir with its tokenizer (tests/model_fixtures.py)."""
  from tests.model_fixtures import make_model_dir
  return make_model_dir(root)[0]
