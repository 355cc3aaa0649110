"""Record sources: JSON / JSONL provenance, mixture YAML schema and sampling, FJR1 records."""
from __future__ import annotations

import math
import os
import pickle

import numpy as np
import pytest

from fusion_jax.data import mixture as M
from fusion_jax.data import sources as S
from fusion_jax.data.errors import BadSample
from pipeline_fixtures import good_record, write_dataset


def _write(path: str, text: str) -> str:
  with open(path, "w") as f:
    f.write(text)
  return path


def test_jsonl_lines_blank_lines_crlf_and_provenance(tmp_path):
  p = _write(str(tmp_path / "a.jsonl"),
             '{"id": "a"}\r\n\n{"id": "b"}\n   \n{bad\n{"id": "c"}')
  src = S.JsonlSource(p, "/imgs")
  assert len(src) == 5  # blank lines are not records; the whitespace-only line is one
  assert [src[i].source for i in range(5)] == [f"{p}:{n}" for n in (1, 3, 4, 5, 6)]
  assert S.parse_record(src[0]) == {"id": "a"} and src[0].image_root == "/imgs"
  assert S.parse_record(src[4]) == {"id": "c"}
  for i in (2, 3):
    with pytest.raises(BadSample) as e:
      S.parse_record(src[i])
    assert e.value.reason == "bad_json" and e.value.source == f"{p}:{4 + i - 2}"
  # Pickles without its file handle (grain ships sources to worker processes).
  src2 = pickle.loads(pickle.dumps(src))
  assert S.parse_record(src2[1]) == {"id": "b"}


def test_json_array_source_and_startup_errors(tmp_path):
  p = write_dataset(str(tmp_path), 5)
  src = S.JsonSource(p)
  assert len(src) == 5 and src[3].source == f"{p}#3"
  assert S.parse_record(src[3]) == good_record(3, image=False)
  with pytest.raises(BadSample, match="bad_json"):
    S.parse_record(S.RawSample([1, 2], "x"))  # a record that is not an object
  bad = _write(str(tmp_path / "bad.json"), '[{"id": 1},\n {"id": 2,,}]')
  with pytest.raises(S.MixtureError, match=r"line 2 column"):
    S.JsonSource(bad)
  with pytest.raises(S.MixtureError, match="array"):
    S.JsonSource(_write(str(tmp_path / "obj.json"), '{"id": 1}'))
  with pytest.raises(S.MixtureError, match="not found"):
    S.JsonSource(str(tmp_path / "none.json"))


@pytest.mark.parametrize("strategy,n,expected", [
    ("all", 40, list(range(40))),
    ("first:7", 40, list(range(7))),
    ("end:5", 40, list(range(35, 40))),
    ("first:10%", 41, list(range(math.ceil(4.1)))),  # ceil(10% of 41) = 5
    ("end:50%", 9, list(range(4, 9))),               # ceil(4.5) = 5
    ("first:100", 12, list(range(12))),              # clamped to the source
])
def test_sampling_counts(strategy, n, expected):
  assert M.sample_indices(n, strategy, seed=0, key="k").tolist() == expected


def test_random_sampling_is_seeded_distinct_and_sized():
  a = M.sample_indices(1000, "random:10%", seed=1, key="x.json")
  assert len(a) == 100 and len(set(a.tolist())) == 100 and a.max() < 1000
  np.testing.assert_array_equal(a, M.sample_indices(1000, "random:100", seed=1, key="x.json"))
  assert not np.array_equal(a, M.sample_indices(1000, "random:100", seed=2, key="x.json"))
  assert not np.array_equal(a, M.sample_indices(1000, "random:100", seed=1, key="y.json"))


@pytest.mark.parametrize("strategy", ["first", "first:", "first:abc", "random:0", "end:-3",
                                      "first:150%", "sample:3", "all:3", 5])
def test_bad_sampling_strategies(strategy):
  with pytest.raises(S.MixtureError, match="sampling_strategy"):
    M.parse_sampling(strategy)


def test_mixture_sampling_counts_and_relative_paths(tmp_path):
  d = tmp_path / "data"
  a = write_dataset(str(d), 20, name="a.json")
  b = write_dataset(str(d), 10, name="b.jsonl", start=100)
  os.makedirs(d / "imgs_b")
  mix = _write(str(d / "mix.yaml"), f"""
datasets:
  - json_path: a.json
    sampling_strategy: "first:25%"
  - json_path: {b}
    sampling_strategy: "random:4"
    image_root: imgs_b
  - json_path: a.json
    sampling_strategy: end:2
""")
  src = M.load_mixture(mix, seed=0, image_root="/root_default")
  assert len(src) == 5 + 4 + 2
  assert [n for _, n in src.sizes()] == [5, 4, 2]
  ids = [S.parse_record(src[i])["id"] for i in range(len(src))]
  assert ids[:5] == [f"s{i}" for i in range(5)] and ids[-2:] == ["s18", "s19"]
  assert all(100 <= int(x[1:]) < 110 for x in ids[5:9])
  assert src[0].image_root == "/root_default" and src[0].source == f"{a}#0"
  assert src[5].image_root == str(d / "imgs_b")  # resolved against the YAML's directory
  assert [S.parse_record(M.load_mixture(mix, seed=0)[i])["id"] for i in range(5, 9)] == ids[5:9]
  with pytest.raises(IndexError):
    src[len(src)]


@pytest.mark.parametrize("body,match", [
    ("- json_path: a.json", "top level must be a mapping"),
    ("datasets: []", "non-empty list"),
    ("datasets:\n  - jsonpath: a.json", "unknown keys \\['jsonpath'\\]"),
    ("datasets:\n  - sampling_strategy: all", "exactly one of json_path or arrayrecord_path"),
    ("datasets:\n  - json_path: a.json\n    arrayrecord_path: x", "exactly one of"),
    ("datasets:\n  - json_path: a.json\n    sampling_strategy: first:x", "sampling_strategy"),
    ("datasets:\n  - json_path: missing.json", "not found"),
    ("datasets:\n  - json_path: a.txt", "unsupported file type"),
    ("datasets:\n  - arrayrecord_path: nowhere", "no ArrayRecord files"),
    ("datasets:\n  - a.json", "must be a mapping"),
    ("datasets:\n  - json_path: a.json\nextra: 1", "unknown top-level keys"),
    ("datasets: [\n", "not valid YAML"),
])
def test_mixture_schema_errors_are_clear(tmp_path, body, match):
  write_dataset(str(tmp_path), 2, name="a.json")
  _write(str(tmp_path / "a.txt"), "")
  mix = _write(str(tmp_path / "m.yaml"), body)
  with pytest.raises(S.MixtureError, match=match) as e:
    M.load_mixture(mix)
  assert "m.yaml" in str(e.value) or "a.txt" in str(e.value)


def test_fjr1_record_round_trip():
  rec = {"id": "é1", "image": "x.png", "conversations": [{"from": "human", "value": "hi"}]}
  data = S.pack_record(rec, b"\x89PNGbytes", "f.json:3")
  back, img, source = S.unpack_record(data)
  assert back == rec and img == b"\x89PNGbytes" and source == "f.json:3"
  back, img, source = S.unpack_record(S.pack_record({"id": 1}), "where")
  assert back == {"id": 1} and img == b"" and source == "where"
  back, img, source = S.unpack_record(b"FSYN" + data[4:], "r#1")  # fusion_jax.synth's tag
  assert back == rec and img == b"\x89PNGbytes" and source == "f.json:3"
  for bad in (b"XXXX" + data[4:], data[:10]):
    with pytest.raises(BadSample) as e:
      S.unpack_record(bad, "r#0")
    assert e.value.reason == "bad_record"


def test_source_from_paths_concatenates(tmp_path):
  a = write_dataset(str(tmp_path), 3, name="a.json")
  b = write_dataset(str(tmp_path), 2, name="b.jsonl", start=10)
  src = M.source_from_paths([a, b], image_root=str(tmp_path))
  assert [S.parse_record(src[i])["id"] for i in range(5)] == ["s0", "s1", "s2", "s10", "s11"]
  assert src.sizes() == [("a.json", 3), ("b.jsonl", 2)]
