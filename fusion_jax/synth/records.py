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
(PNG or JPEG, possibly empty for text-only records); the layout of
fusion_jax.data.sources' ArrayRecord records under the tag SYNTH_MAGIC, which reads them.
"""
from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any, Mapping, Sequence

from fusion_jax.data.sources import SYNTH_MAGIC
from fusion_jax.data.tokenizer import IMAGE_MARKER

ANSWER_TYPES = ("color", "count", "yes_no", "choice", "spatial", "text", "shape", "pattern",
                "difference")


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
      q = f"{IMAGE_MARKER}\n{q}"
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


def encode_entry(record: Mapping[str, Any], image_bytes: bytes = b"") -> bytes:
  """ArrayRecord entry bytes: magic, JSON length, JSON, image bytes (see module docstring)."""
  js = json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")
  return SYNTH_MAGIC + struct.pack("<I", len(js)) + js + image_bytes


def write_arrayrecord(path: str, entries: Sequence[bytes]) -> None:
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(path, "group_size:1")
  try:
    for e in entries:
      writer.write(e)
  finally:
    writer.close()
