"""Synthesized-record helpers for the tests: the record schema check and an ArrayRecord reader
(the pipeline reads these files through fusion_jax.data.sources)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from fusion_jax.data.sources import unpack_record
from fusion_jax.data.tokenizer import IMAGE_MARKER
from fusion_jax.synth.records import ANSWER_TYPES


def validate_record(rec: Mapping[str, Any]) -> None:
  """Raise ValueError (naming the record id and the problem) unless `rec` is a valid record."""
  rid = rec.get("id", "<no id>")

  def bad(msg: str) -> None:
    raise ValueError(f"synth record {rid!r}: {msg}")

  if not isinstance(rec.get("id"), str) or not rec["id"]:
    bad("'id' must be a non-empty string")
  conv = rec.get("conversations")
  if not isinstance(conv, list) or not conv or len(conv) % 2:
    bad("'conversations' must be a non-empty list of human/gpt pairs")
  for k, msg in enumerate(conv):
    want = "human" if k % 2 == 0 else "gpt"
    if not isinstance(msg, Mapping) or msg.get("from") != want:
      bad(f"conversations[{k}] must come from {want!r}")
    if not isinstance(msg.get("value"), str) or not msg["value"].strip():
      bad(f"conversations[{k}] has an empty value")
  n_tokens = sum(m["value"].count(IMAGE_MARKER) for m in conv)
  if "image" in rec:
    if not isinstance(rec["image"], str) or rec["image"].startswith("/"):
      bad("'image' must be a relative path")
    if n_tokens != 1 or not conv[0]["value"].startswith(IMAGE_MARKER):
      bad(f"an image record needs exactly one {IMAGE_MARKER} at the start of the first message")
  elif n_tokens:
    bad(f"{IMAGE_MARKER} in a record without an image")
  if not isinstance(rec.get("category"), str):
    bad("'category' must be a string")
  qa = rec.get("qa")
  if not isinstance(qa, list) or len(qa) != len(conv) // 2:
    bad("'qa' must be a list with one entry (or null) per gpt turn")
  for k, q in enumerate(qa):
    if q is None:
      continue
    cands = q.get("candidates")
    if not isinstance(cands, list) or len(cands) < 2 or len(set(cands)) != len(cands):
      bad(f"qa[{k}]: 'candidates' must list >= 2 distinct strings")
    if q.get("answer") not in cands:
      bad(f"qa[{k}]: answer {q.get('answer')!r} is not one of the candidates {cands}")
    if q["answer"] != conv[2 * k + 1]["value"]:
      bad(f"qa[{k}]: answer {q['answer']!r} differs from the gpt turn "
          f"{conv[2 * k + 1]['value']!r}")
    if q.get("answer_type") not in ANSWER_TYPES:
      bad(f"qa[{k}]: unknown answer_type {q.get('answer_type')!r}; valid: {ANSWER_TYPES}")


def read_arrayrecord(path: str) -> Iterator[tuple[dict[str, Any], bytes]]:
  """Yield (record, image bytes) from a synth ArrayRecord file."""
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      rec, image, _ = unpack_record(reader.read([i])[0], f"{path}#{i}")
      yield rec, image
  finally:
    reader.close()
