"""Data reliability: image paths confined to the image root, no silently lost final batch,
role errors named as such."""
from __future__ import annotations

import json
import logging
import os

import pytest

from fusion_jax.data import images as images_lib
from fusion_jax.data import pipeline as pl
from fusion_jax.data.conversation import encode_conversation
from fusion_jax.data.errors import BadSample
from pipeline_fixtures import (TINY_CFG, batch_sample_ids, good_record, png_bytes,
                               tmp, tok, write_dataset)  # noqa: F401 (fixtures)


def _png(path: str, value: int = 1) -> str:
  with open(path, "wb") as f:
    f.write(png_bytes(value))
  return path


@pytest.fixture(scope="module")
def hostile_root(tmp):
  """<tmp>/hostile/root/img/{0..3}.png (good), <tmp>/hostile/outside.png, and links inside the
  root: img/escape.png -> ../../outside.png (escapes), img/alias.png -> 0.png (stays)."""
  base = os.path.join(tmp, "hostile")
  root = os.path.join(base, "root")
  os.makedirs(os.path.join(root, "img"))
  outside = _png(os.path.join(base, "outside.png"), 9)
  os.symlink(outside, os.path.join(root, "img", "escape.png"))
  os.symlink(os.path.join(root, "img", "0.png"), os.path.join(root, "img", "alias.png"))
  return base, root, outside


def test_resolve_image_path_confines_to_root(hostile_root):
  _, root, outside = hostile_root
  resolve = images_lib.resolve_image_path
  assert resolve("img/alias.png", root) == os.path.realpath(os.path.join(root, "img", "0.png"))
  assert resolve("img/./sub/../0.png", root) == os.path.realpath(os.path.join(root, "img",
                                                                              "0.png"))
  for bad in ("../outside.png", "img/../../outside.png", "/etc/passwd", outside,
              "img/escape.png"):
    with pytest.raises(BadSample) as e:
      resolve(bad, root, source="data.json:3 (id r3)")
    assert e.value.reason == "image_outside_root" and e.value.source == "data.json:3 (id r3)"
  with pytest.raises(BadSample, match="allow_absolute_image_paths"):
    resolve(outside, root)
  with pytest.raises(BadSample, match="through a symlink"):
    resolve("img/escape.png", root)
  assert resolve(outside, root, allow_absolute=True) == outside
  with pytest.raises(BadSample, match="outside the image root"):  # relative stays confined
    resolve("../outside.png", root, allow_absolute=True)


def _hostile_records(outside: str) -> list[dict]:
  recs = []
  for i, image in enumerate(("img/0.png", "../outside.png", outside, "img/escape.png",
                             "img/alias.png")):
    r = good_record(i, True)
    r["image"] = image
    r["id"] = f"hostile{i}"
    recs.append(r)
  return recs


def test_pipeline_skips_escaping_images_and_logs_record_id(hostile_root, tok, caplog):
  base, root, outside = hostile_root
  path = os.path.join(base, "records.jsonl")
  _png(os.path.join(root, "img", "0.png"), 0)
  with open(path, "w") as f:
    for r in _hostile_records(outside):
      f.write(json.dumps(r) + "\n")
  cfg = dict(TINY_CFG, paths=(path,), image_root=root, batch_size=1)
  with caplog.at_level(logging.WARNING):
    it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1, train=False)
    ids = sorted(i for b in it for i in batch_sample_ids(b, tok))
  assert ids == [0, 4]  # the plain image and the link that stays inside the root
  assert it.skip_counters() == {"image_outside_root": 3}
  logged = caplog.text
  for rid in ("hostile1", "hostile2", "hostile3"):
    assert f"(id {rid})" in logged
  # The explicit switch admits the absolute path (only that one).
  it = pl.make_pipeline(dict(cfg, allow_absolute_image_paths=True), tok, process_index=0,
                        process_count=1, train=False)
  ids = sorted(i for b in it for i in batch_sample_ids(b, tok))
  assert ids == [0, 2, 4] and it.skip_counters() == {"image_outside_root": 2}


@pytest.fixture(scope="module")
def eleven(tmp):
  """11 good records + one bad one at the end (a trailing skip)."""
  root = os.path.join(tmp, "eleven")
  bad = {"id": "x", "conversations": [{"from": "gpt", "value": "only an answer"}]}
  return root, write_dataset(root, 11, extra=[bad])


def test_final_partial_batch_is_counted_when_not_trained(eleven, tok):
  root, path = eleven
  cfg = dict(TINY_CFG, paths=(path,), image_root=root, batch_size=4, num_epochs=1)
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 2
  # Every record is accounted for: 8 trained, 3 dropped_remainder, 1 skipped.
  assert it.counters["samples"] == 8
  assert it.skip_counters() == {"dropped_remainder": 3, "no_answer_turn": 1}
  assert it.get_state()["counters"]["dropped_remainder"] == 3


def test_final_partial_batch_trained_padded_with_empty_rows(eleven, tok):
  root, path = eleven
  cfg = dict(TINY_CFG, paths=(path,), image_root=root, batch_size=4, num_epochs=1,
             pad_final_batch=True)
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  batches = list(it)
  assert len(batches) == 3
  assert sorted(i for b in batches for i in batch_sample_ids(b, tok)) == list(range(11))
  assert it.counters["samples"] == 11 and it.skip_counters() == {"no_answer_turn": 1}
  last = batches[-1]
  assert last["token_mask"].shape[0] == 4
  # The padded row carries nothing a token / instruction loss term or denominator counts.
  assert not last["token_mask"][3].any() and (last["labels"][3] == -100).all()
  assert not last["has_image"][3] and not last["instructs_mask"][3].any()
  assert (last["latent_pos"][3] == -1).all() and (last["question_pos"][3] == -1).all()
  assert last["token_mask"][:3].any(axis=1).all()


def test_two_human_turns_in_a_row_is_a_role_error(tok):
  h = lambda v: {"from": "human", "value": v}  # noqa: E731
  g = lambda v: {"from": "gpt", "value": v}  # noqa: E731
  for conv, turns in (([h("a"), h("b")], "turns 0 and 1 are both human"),
                      ([h("a"), g("b"), h("c"), h("d")], "turns 2 and 3 are both human"),
                      ([g("a"), g("b"), h("c"), g("d")], "turns 0 and 1 are both gpt")):
    with pytest.raises(BadSample) as e:
      encode_conversation({"id": "r", "conversations": conv}, tok, "phi_3")
    assert e.value.reason == "non_alternating_roles", conv
    assert turns in str(e.value)
  # A single trailing human turn is still a fix-up, not an error.
  enc = encode_conversation({"conversations": [h("a"), g("b"), h("c")]}, tok, "phi_3")
  assert enc.fixups == ("trailing_human",)
