"""LLaVA JSON + images -> ArrayRecord shards (FJR1) -> the same training batches; resumable."""
from __future__ import annotations

import json
import os

import pytest

from fusion_jax.data import pipeline as pl
from fusion_jax.data import mixture as M
from fusion_jax.data import sources as S
from fusion_jax.data import to_arrayrecord as tar
from pipeline_fixtures import TINY_CFG, assert_batches_equal, make_tokenizer, write_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("ar"))
  write_dataset(root, 10, name="a.json")
  extra = ['{"id": "broken", ', {"id": "m", "image": "img/nope.png", "conversations": [
      {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "answer 99"}]},
           {"id": "out", "image": "../outside.png", "conversations": [
      {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "answer 98"}]}]
  with open(os.path.join(os.path.dirname(root), "outside.png"), "wb") as f:
    f.write(b"not inside the image root")  # exists, and must not be read
  write_dataset(root, 6, name="b.jsonl", start=20, extra=extra)
  mix = os.path.join(root, "mix.yaml")
  with open(mix, "w") as f:
    f.write("datasets:\n  - json_path: a.json\n    sampling_strategy: all\n"
            "  - json_path: b.jsonl\n    sampling_strategy: all\n")
  out = os.path.join(root, "shards")
  assert tar.main(["--mixture", mix, "--image_root", root, "--out", out, "--shards", "3",
                   "--no_progress"]) == 0
  return root, mix, out


def test_round_trip_records_and_images(data):
  root, mix, out = data
  with open(os.path.join(out, "manifest.json")) as f:
    manifest = json.load(f)
  assert manifest["complete"] and manifest["records"] == 16
  assert manifest["skipped"] == {"bad_json": 1, "missing_image": 1, "image_outside_root": 1}
  assert {e["reason"]: e["source"].rsplit("/", 1)[1] for e in manifest["skipped_examples"]} == {
      "bad_json": "b.jsonl:7", "missing_image": "b.jsonl:8", "image_outside_root": "b.jsonl:9"}
  assert len(manifest["shards"]) == 3
  ar = S.ArrayRecordSource(out)
  assert len(ar) == 16
  orig = M.load_mixture(mix, image_root=root)
  for i in range(16):
    raw, want = ar[i], orig[i]
    assert S.parse_record(raw) == S.parse_record(want)
    assert raw.source == want.source  # provenance survives conversion
    rec = S.parse_record(want)
    if rec.get("image"):
      with open(os.path.join(root, rec["image"]), "rb") as f:
        assert raw.image_bytes == f.read()
    else:
      assert raw.image_bytes is None


def test_pipeline_from_shards_equals_pipeline_from_json(data):
  root, mix, out = data
  tok = make_tokenizer(root)
  common = dict(TINY_CFG, batch_size=4)
  from_json = list(pl.make_pipeline(dict(common, mixture=mix, image_root=root), tok,
                                    process_index=0, process_count=1, train=False))
  via = pl.make_pipeline(dict(common, paths=(out,)), tok, process_index=0, process_count=1,
                         train=False)
  from_ar = list(via)
  assert len(from_ar) == len(from_json) == 4
  for a, b in zip(from_json, from_ar):
    assert_batches_equal(a, b)
  assert via.counters["samples"] == 16 and via.skip_counters() == {}
  # A mixture entry can point at shards, with sampling.
  mix2 = os.path.join(root, "mix2.yaml")
  with open(mix2, "w") as f:
    f.write(f"datasets:\n  - arrayrecord_path: {out}\n    sampling_strategy: end:3\n")
  src = M.load_mixture(mix2)
  assert [S.parse_record(src[i])["id"] for i in range(3)] == ["s23", "s24", "s25"]


def test_conversion_resumes_and_refuses_other_layouts(data):
  root, mix, out = data
  names = [os.path.join(out, tar.shard_name(k, 3)) for k in range(3)]
  before = {n: os.stat(n).st_mtime_ns for n in names}
  with open(names[1], "rb") as f:
    shard1 = f.read()
  os.remove(names[1])
  os.remove(names[1] + ".done.json")
  with open(names[1] + ".tmp", "wb") as f:  # a crashed run's leftover
    f.write(b"partial")
  assert tar.main(["--mixture", mix, "--image_root", root, "--out", out, "--shards", "3",
                   "--no_progress"]) == 0
  assert os.stat(names[0]).st_mtime_ns == before[names[0]]  # complete shards not rewritten
  assert os.stat(names[2]).st_mtime_ns == before[names[2]]
  assert not os.path.exists(names[1] + ".tmp")
  with open(names[1], "rb") as f:
    assert f.read() == shard1
  assert len(S.ArrayRecordSource(out)) == 16
  assert tar.main(["--mixture", mix, "--image_root", root, "--out", out, "--shards", "5",
                   "--no_progress"]) == 2


def test_shard_ranges_cover_everything():
  for n, k in ((10, 3), (2, 4), (0, 2), (7, 7)):
    r = tar.shard_ranges(n, k)
    assert len(r) == k and r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r, r[1:]))


def test_undecodable_shard_record_is_skipped_and_counted(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  tok = make_tokenizer(str(tmp_path))
  shard = str(tmp_path / "x.array_record")
  w = ArrayRecordWriter(shard, "group_size:1")
  w.write(S.pack_record({"id": "s0", "conversations": [
      {"from": "human", "value": "q"}, {"from": "gpt", "value": "answer 0"}]}, b"", "f:1"))
  w.write(b"not an FJR1 record")
  w.close()
  it = pl.make_pipeline(dict(TINY_CFG, paths=(shard,), batch_size=1), tok, process_index=0,
                        process_count=1, train=False)
  assert len(list(it)) == 1
  assert it.skip_counters() == {"bad_record": 1}
  assert it.recent_skips[0].source == "arrayrecord#1"
