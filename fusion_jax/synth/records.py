"""Synthesized records: the question/answer `Turn`, LLaVA records, and the ArrayRecord format.

LLaVA record written for every sample (docs/model.md §9 plus synthesis keys):

  {"id": "synth_00000042",
   "image": "images/synth_00000042.png",
   "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the circle?"},
                     {"from": "gpt", "value": "red"}, ...],
   "category": "SynthColor",
   "caption": "A striped beige background with a large red circle at the center. ...",
   "qa": [{"answer": "red", "answer_type": "color", "candidates": ["red", ...],
           "kind": "color_of"}, ...]}

"qa" is aligned with the gpt turns: one entry per answer, null for open answers. A closed answer
is exactly one of "candidates" (short canonical strings), so an evaluator can score the answer
log-likelihood over the candidates; chance level is 1 / len(candidates). Multiple-choice
entries also carry "options" (the option texts in letter order).

ArrayRecord format (`--arrayrecord`): one ArrayRecord entry per sample, bytes =
  b"FSYN" + uint32 little-endian N + N bytes of UTF-8 JSON (the LLaVA record) + image bytes
(PNG or JPEG, possibly empty for text-only records). `decode_entry` reverses it.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Iterator, Mapping, Sequence

IMAGE_TOKEN = "<image>"
ANSWER_TYPES = ("color", "count", "yes_no", "choice", "spatial", "text", "shape", "pattern",
                "difference")
_MAGIC = b"FSYN"


@dataclasses.dataclass
class Turn:
  """One question and its answer.

  qa: closed-answer metadata {"answer", "answer_type", "candidates", "kind"[, "options"]} or
    None for an open answer.
  check: how the filter can verify the answer from pixels (see measure.measure); never written
    to the record. "refs" inside it lists the object references ({"color"?, "shape"?}) the
    question uses; each must match exactly one object.
  """
  question: str
  answer: str
  qa: dict[str, Any] | None = None
  check: dict[str, Any] | None = None


def closed(answer: str, answer_type: str, candidates: Sequence[str], kind: str,
           **extra: Any) -> dict[str, Any]:
  """A qa entry for a closed-answer question."""
  return {"answer": answer, "answer_type": answer_type, "candidates": list(candidates),
          "kind": kind, **extra}


def build_record(sample_id: str, category: str, turns: Sequence[Turn], caption: str,
                 image_path: str | None) -> dict[str, Any]:
  """LLaVA record; the image token goes in front of the first human message."""
  conv = []
  for k, t in enumerate(turns):
    q = t.question
    if k == 0 and image_path is not None:
      q = f"{IMAGE_TOKEN}\n{q}"
    conv.append({"from": "human", "value": q})
    conv.append({"from": "gpt", "value": t.answer})
  rec: dict[str, Any] = {"id": sample_id}
  if image_path is not None:
    rec["image"] = image_path
  rec["conversations"] = conv
  rec["category"] = category
  rec["caption"] = caption
  rec["qa"] = [dict(t.qa) if t.qa is not None else None for t in turns]
  return rec


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
  n_tokens = sum(m["value"].count(IMAGE_TOKEN) for m in conv)
  if "image" in rec:
    if not isinstance(rec["image"], str) or rec["image"].startswith("/"):
      bad("'image' must be a relative path")
    if n_tokens != 1 or not conv[0]["value"].startswith(IMAGE_TOKEN):
      bad(f"an image record needs exactly one {IMAGE_TOKEN} at the start of the first message")
  elif n_tokens:
    bad(f"{IMAGE_TOKEN} in a record without an image")
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


def encode_entry(record: Mapping[str, Any], image_bytes: bytes = b"") -> bytes:
  """ArrayRecord entry bytes: magic, JSON length, JSON, image bytes (see module docstring)."""
  js = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
  return _MAGIC + struct.pack("<I", len(js)) + js + image_bytes


def decode_entry(data: bytes) -> tuple[dict[str, Any], bytes]:
  """Inverse of encode_entry: (record, image bytes)."""
  if data[:4] != _MAGIC:
    raise ValueError("not a fusion_jax synth ArrayRecord entry (bad magic; expected b'FSYN')")
  (n,) = struct.unpack("<I", data[4:8])
  return json.loads(data[8:8 + n].decode("utf-8")), data[8 + n:]


def write_arrayrecord(path: str, entries: Sequence[bytes]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  try:
    for e in entries:
      writer.write(e)
  finally:
    writer.close()


def read_arrayrecord(path: str) -> Iterator[tuple[dict[str, Any], bytes]]:
  """Yield (record, image bytes) from a synth ArrayRecord file."""
  from array_record.python.array_record_module import ArrayRecordReader
  reader = ArrayRecordReader(path)
  try:
    for i in range(reader.num_records()):
      yield decode_entry(reader.read([i])[0])
  finally:
    reader.close()
