"""Benchmark files as users have them -> `Row`s: VLMEvalKit TSVs and LLaVA question jsonl.

VLMEvalKit TSV (MMBench_DEV_EN.tsv, POPE.tsv, MME.tsv, ScienceQA_IMG.tsv, TextVQA_VAL.tsv,
GQA_TestDev_Balanced.tsv, MMVP.tsv, CV-Bench*.tsv): one row per question with columns
`index`, `question`, option columns `A`, `B`, ... where the benchmark is multiple choice,
`answer`, `category`, `image` (base64 of the encoded image) and, where present, `hint`,
`image_path`, `l2-category`, `source`. As in VLMEvalKit (vlmeval/dataset/image_base.py), an
`image` cell of at most 64 characters is the `index` of the row that holds the image (files
store each image once). TextVQA's `answer` is the list of the 10 human answers as Python/JSON
text ("['a', 'b', ...]"), as are OCRBench's, DocVQA's and InfoVQA's; VizWiz's file names that
column `answers`. A row with several images (MMMU) has a list of base64 strings in `image`: the
row keeps the first (`Row.image_count` says how many there were; bench.py asks such rows only
for benchmarks that accept the first image).

LLaVA question jsonl (llava/eval/model_vqa_loader.py inputs): one JSON object per line with
`question_id`, `image` (relative to --image_root) and `text` (the question, possibly already
ending in the answer instruction), optionally `category`; the answers come from a separate
file (`answers_for_jsonl`).

Bad rows (no question, no / undecodable image, unreadable answer) are returned as
`(index, reason)` pairs, never silently dropped and never an exception deep in generation.
"""
from __future__ import annotations

import ast
import base64
import binascii
import csv
import dataclasses
import io
import json
import os
import string
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image

# VLMEvalKit: an image cell this short is another row's index, not base64.
IMAGE_REF_MAX_LEN = 64
# VLMEvalKit's circular copies of a multiple-choice question have index + k * 1e6.
CIRCULAR_OFFSET = 1_000_000
_MISSING = ("", "nan", "none")


@dataclasses.dataclass
class Row:
  """One benchmark question.

  index: the row's id (TSV `index`, jsonl `question_id`) as text.
  question: the question text (jsonl: `text`).
  answer: the reference: a string, or the list of human answers (TextVQA).
  options: letter -> option text of a multiple-choice row ({} otherwise), in letter order.
  image: encoded image bytes (TSV), a file path (jsonl) or None (text-only).
  image_key: identifies the image (MME pairs two questions per image).
  extra: other columns (hint, source, l2-category, prompt, ...), missing values dropped.
  position: the row's place in the file, bad rows included (MMVP pairs rows 2i and 2i+1).
  image_count: images the row had (`image` holds the first); 0 for a text-only row.
  """
  index: str
  question: str
  answer: Any
  category: str = ""
  options: dict[str, str] = dataclasses.field(default_factory=dict)
  hint: str = ""
  image: bytes | str | None = None
  image_key: str = ""
  extra: dict[str, str] = dataclasses.field(default_factory=dict)
  position: int = 0
  image_count: int = 0


def _present(value: Any) -> bool:
  return value is not None and str(value).strip().lower() not in _MISSING


def _check_image(data: bytes | str, index: str) -> str | None:
  """None when `data` starts like an image PIL can read; else the reason. Only the header is
  read (the pixels are decoded once, at generation, which refuses truncated images)."""
  try:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
      im.size  # noqa: B018 - the header parsed
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    return f"row {index}: not a readable image ({type(e).__name__}: {e})"
  return None


def _decode_b64(cell: str) -> bytes | None:
  try:
    return base64.b64decode(cell, validate=True)
  except (binascii.Error, ValueError):
    return None


def read_tsv(path: str, *, check_images: bool = True) -> tuple[list[Row], list[tuple[str, str]]]:
  """(rows, bad) of a VLMEvalKit TSV; bad = [(index, reason)] for rows that cannot be asked."""
  csv.field_size_limit(sys.maxsize)  # base64 images are far beyond csv's 128 KiB default
  with open(path, newline="", encoding="utf-8") as f:
    reader = csv.DictReader(f, delimiter="\t")
    table = [dict(r) for r in reader]
    header = reader.fieldnames or []
  for col in ("index", "question"):
    if col not in header:
      raise ValueError(f"{path}: no '{col}' column (columns: {header[:12]}); is this a "
                       "VLMEvalKit benchmark TSV?")
  letters = [c for c in header if len(c) == 1 and c in string.ascii_uppercase]
  images = {r["index"]: r.get("image") or "" for r in table}
  rows, bad = [], []
  decoded: dict[str, tuple[bytes | None, str]] = {}  # image key -> (bytes, why not)
  for pos, r in enumerate(table):
    idx = str(r["index"]).strip()
    if not _present(r.get("question")):
      bad.append((idx, "empty question"))
      continue
    cell = (r.get("image") or "").strip()
    key = idx
    if 0 < len(cell) <= IMAGE_REF_MAX_LEN:  # a reference to the row holding the image
      key = cell
      cell = (images.get(cell) or "").strip()
      if len(cell) <= IMAGE_REF_MAX_LEN:
        bad.append((idx, f"image refers to row {key!r}, which holds no image"))
        continue
    image, count = None, 0
    if cell:
      count = 1
      if cell.startswith("["):  # several images (MMMU): keep the first, remember how many
        try:
          cells = [str(c).strip() for c in ast.literal_eval(cell)]
        except (ValueError, SyntaxError):
          cells = []
        if not cells or len(cells[0]) <= IMAGE_REF_MAX_LEN:
          bad.append((idx, "the image cell is not a list of base64 images"))
          continue
        cell, count = cells[0], len(cells)
      if key not in decoded:
        data = _decode_b64(cell)
        why = "the image cell is not valid base64" if data is None else ""
        if data is not None and check_images:
          why = _check_image(data, key) or ""
        decoded[key] = (None if why else data, why)
      image, why = decoded[key]
      if image is None:
        bad.append((idx, why))
        continue
    elif "image" in header:
      bad.append((idx, "missing image"))
      continue
    answer_col = "answer" if _present(r.get("answer")) or "answers" not in header else "answers"
    answer: Any = (r.get(answer_col) or "").strip()
    if answer.startswith("["):  # TextVQA: the list of human answers
      try:
        answer = [str(a) for a in ast.literal_eval(answer)]
      except (ValueError, SyntaxError):
        bad.append((idx, f"answer list {answer[:40]!r} is not a Python/JSON list"))
        continue
    options = {c: str(r[c]).strip() for c in letters if _present(r.get(c))}
    skip = {"index", "question", "answer", answer_col, "category", "image", "hint", *letters}
    extra = {k: str(v) for k, v in r.items() if k and k not in skip and _present(v)}
    image_key = extra.get("image_path") or key
    rows.append(Row(index=idx, question=str(r["question"]), answer=answer,
                    category=str(r.get("category") or "").strip(), options=options,
                    hint=str(r["hint"]).strip() if _present(r.get("hint")) else "",
                    image=image, image_key=image_key, extra=extra, position=pos,
                    image_count=count))
  return rows, bad


def _load_json_or_jsonl(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    if path.endswith(".jsonl"):
      out = []
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            out.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e})") from e
      return out
    return json.load(f)


_ANSWER_KEYS = ("answers", "answer", "label", "text")


def _answer_of(entry: Any) -> Any:
  if not isinstance(entry, Mapping):
    return entry
  for k in _ANSWER_KEYS:
    if k in entry:
      v = entry[k]
      if k == "answers" and v and isinstance(v[0], Mapping):  # VQA v2 layout: [{"answer": ..}]
        return [str(a["answer"]) for a in v]
      return v
  return None


def answers_for_jsonl(path: str) -> dict[str, Any]:
  """question_id -> reference answer(s) from an answer file.

  Accepts: jsonl / json list of {question_id, answer | answers | label | text} (POPE's
  coco_pope_*.json, LLaVA answer files); {"data": [...]} or {"annotations": [...]}
  (TextVQA_0.5.1_val.json, VQA v2); or {question_id: {"answer": ...}} (GQA's
  testdev_balanced_questions.json).
  """
  data = _load_json_or_jsonl(path)
  if isinstance(data, Mapping):
    for k in ("data", "annotations", "questions"):
      if isinstance(data.get(k), list):
        data = data[k]
        break
  out: dict[str, Any] = {}
  if isinstance(data, Mapping):
    for qid, entry in data.items():
      out[str(qid)] = _answer_of(entry)
  elif isinstance(data, list):
    for entry in data:
      if isinstance(entry, Mapping) and "question_id" in entry:
        out[str(entry["question_id"])] = _answer_of(entry)
  if not out:
    raise ValueError(f"{path}: no answers found (expected question_id + answer/answers/label "
                     "entries, or a {question_id: {answer}} mapping)")
  return out


def read_jsonl(path: str, answers: Mapping[str, Any], *, image_root: str,
               check_images: bool = True) -> tuple[list[Row], list[tuple[str, str]]]:
  """(rows, bad) of a LLaVA question jsonl with references from `answers` (answers_for_jsonl)."""
  rows, bad = [], []
  for n, rec in enumerate(_load_json_or_jsonl(path)):
    if not isinstance(rec, Mapping):
      bad.append((f"line {n + 1}", "not a JSON object"))
      continue
    idx = str(rec.get("question_id", rec.get("id", f"line {n + 1}")))
    text = rec.get("text", rec.get("question"))
    if not _present(text):
      bad.append((idx, "no 'text' (question)"))
      continue
    if idx not in answers or answers[idx] is None:
      bad.append((idx, "no reference answer in the answers file"))
      continue
    image = None
    if rec.get("image"):
      image = os.path.join(image_root, str(rec["image"]))
      if not os.path.isfile(image):
        bad.append((idx, f"missing image {image}"))
        continue
      if check_images and (reason := _check_image(image, idx)):
        bad.append((idx, reason))
        continue
    ans = answers[idx]
    ans = [str(a) for a in ans] if isinstance(ans, (list, tuple)) else str(ans)
    extra = {k: str(v) for k, v in rec.items()
             if k not in ("question_id", "text", "image", "category") and _present(v)}
    rows.append(Row(index=idx, question=str(text), answer=ans,
                    category=str(rec.get("category") or ""), image=image,
                    image_key=str(rec.get("image") or idx), extra=extra, position=n,
                    image_count=int(image is not None)))
  return rows, bad


def limit_rows(rows: Sequence[Row], limit: int | None) -> list[Row]:
  """The first `limit` questions; a kept question keeps all its circular copies."""
  if not limit:
    return list(rows)
  keep, seen = [], set()
  for r in rows:
    g = group_index(r)
    if g not in seen:
      if len(seen) == limit:
        continue
      seen.add(g)
    keep.append(r)
  return keep


def group_index(row: Row) -> str:
  """The question a row belongs to: VLMEvalKit circular copies share index % 1e6."""
  try:
    return str(int(row.index) % CIRCULAR_OFFSET)
  except ValueError:
    return row.index
