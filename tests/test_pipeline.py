"""The grain pipeline: batch contract, host sharding, q per batch, resume, bad input, workers."""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np
import pytest

from fusion_jax.data import pipeline as pl
from fusion_jax.data.errors import BadSample
from fusion_jax.data.layout import choose_q
from fusion_jax.models.batch_spec import check_batch
from fusion_jax.parallel.sharding import make_mesh
from pipeline_fixtures import (TINY_CFG, assert_batches_equal, batch_sample_ids, good_record,
                               png_bytes, tmp, tok, to_global_batch,  # noqa: F401 (fixtures)
                               write_dataset)


@pytest.fixture(scope="module")
def clean_ds(tmp):
  root = os.path.join(tmp, "clean")
  return root, write_dataset(root, 11)


def _bad_lines(root: str) -> list:
  """One JSONL line per bad-input kind (and one fix-up), with the reason each must produce."""
  os.makedirs(os.path.join(root, "img"), exist_ok=True)
  with open(os.path.join(root, "img", "corrupt.png"), "wb") as f:
    f.write(png_bytes(1)[:40])  # truncated PNG
  h = lambda v: {"from": "human", "value": v}  # noqa: E731
  g = lambda v: {"from": "gpt", "value": v}  # noqa: E731
  return [
      ("missing_image", {"id": "a", "image": "img/nope.png",
                         "conversations": [h("<image>\nq"), g("answer 90")]}),
      ("corrupt_image", {"id": "b", "image": "img/corrupt.png",
                         "conversations": [h("<image>\nq"), g("answer 91")]}),
      ("bad_json", '{"id": "c", "conversations": [ broken'),
      ("no_answer_turn", {"id": "d", "conversations": [h("only a question")]}),
      ("empty_text", {"id": "e", "conversations": [h("q"), g("   ")]}),
      ("non_alternating_roles", {"id": "f", "conversations": [h("q"), h("q2"), g("answer 92")]}),
      ("no_supervised_tokens", {"id": "h", "conversations": [h("question " * 120),
                                                             g("answer 93")]}),
      # Not a skip: the leading gpt turn is dropped (as the authors), the sample is kept.
      ("starts_with_gpt", {"id": "i", "conversations": [g("hello"), h("q"), g("answer 50")]}),
  ]


def _cfg(path: str, root: str, **kw) -> dict:
  return dict(TINY_CFG, paths=(path,), image_root=root, **kw)


def test_batch_contract_and_q_per_batch(clean_ds, tok):
  root, path = clean_ds
  it = pl.make_pipeline(_cfg(path, root), tok, process_index=0, process_count=1)
  B, S, Lq, T, H = 2, 96, 2, 16, 28
  for i in range(4):
    b = next(it)
    q = choose_q(TINY_CFG["seed"], i, TINY_CFG["query_len"])
    want = {"input_ids": ((B, S), np.int32), "token_mask": ((B, S), np.bool_),
            "segment_ids": ((B, S), np.int32),
            "positions": ((B, S), np.int32), "labels": ((B, S), np.int32),
            "images": ((B, 1, 5, H, H, 3), np.uint8), "has_image": ((B, 1), np.bool_),
            "image_start": ((B, 1), np.int32), "latent_pos": ((B, 1, Lq * q), np.int32),
            "question_pos": ((B, 1, Lq), np.int32), "instructs": ((B, 1, T), np.int32),
            "instructs_mask": ((B, 1, T), np.bool_)}
    assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    check_batch(b)
    assert b["latent_pos"].shape[2] // Lq == q
    for r in range(B):
      sid = batch_sample_ids({k: v[r:r + 1] for k, v in b.items()}, tok)[0]
      assert bool(b["has_image"][r, 0]) == (sid % 2 == 0)
      if b["has_image"][r, 0]:
        assert b["images"][r].any() and b["image_start"][r, 0] >= 0
      else:
        assert not b["images"][r].any() and b["image_start"][r, 0] == -1
  assert it.counters["samples"] == 8
  assert it.skip_counters() == {}


def test_two_processes_read_disjoint_complete_shards(clean_ds, tok):
  root, path = clean_ds
  seen = []
  for p in range(2):
    it = pl.make_pipeline(_cfg(path, root, batch_size=1, num_epochs=1), tok,
                          process_index=p, process_count=2)
    seen.append([i for b in it for i in batch_sample_ids(b, tok)])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == list(range(11))
  assert [len(s) for s in seen] == [6, 5]
  assert seen[0] != sorted(seen[0]) or seen[1] != sorted(seen[1])  # globally shuffled


def test_resume_continues_with_identical_next_batch(tmp, tok):
  root = os.path.join(tmp, "resume")
  bad = [{"id": "x", "conversations": [{"from": "human", "value": "no answer"}]}]
  path = write_dataset(root, 7, extra=bad)
  cfg = _cfg(path, root, prefetch=2)  # forever, so epochs (reshuffled) are crossed
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what orbax would store
  counters = dict(it.counters)
  want = [next(it) for _ in range(4)]
  it.close()
  it2 = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  it2.set_state(state)
  assert it2.counters == counters
  for i, w in enumerate(want):
    got = next(it2)
    assert_batches_equal(w, got)
    assert got["latent_pos"].shape[2] // 2 == choose_q(TINY_CFG["seed"], 5 + i, (1, 4))
  assert it2.counters == it.counters
  assert it.counters["no_answer_turn"] >= 1
  it2.close()


def test_bad_inputs_are_skipped_counted_and_batches_stay_full(tmp, tok):
  root = os.path.join(tmp, "bad")
  lines = _bad_lines(root)
  path = write_dataset(root, 8, name="mixed.jsonl", extra=[r for _, r in lines])
  it = pl.make_pipeline(_cfg(path, root, batch_size=3), tok, process_index=0,
                        process_count=1, train=False)
  batches = list(it)
  assert len(batches) == 3  # 9 good samples, batch 3: nothing lost, every batch full
  ids = [i for b in batches for i in batch_sample_ids(b, tok)]
  assert sorted(ids) == list(range(8)) + [50]
  expected = {reason: 1 for reason, _ in lines}
  assert it.skip_counters() == expected
  assert it.counters["samples"] == 9
  bad_json = [s for s in it.recent_skips if s.reason == "bad_json"]
  assert bad_json[0].source == f"{path}:11"  # file:line of the broken line


@pytest.mark.parametrize("index", range(7))
def test_strict_mode_raises_each_bad_input(tmp, tok, index):
  root = os.path.join(tmp, f"strict{index}")
  reason, rec = _bad_lines(root)[index]
  path = write_dataset(root, 0, name="one.jsonl", extra=[rec])
  it = pl.make_pipeline(_cfg(path, root, strict=True), tok, process_index=0, process_count=1,
                        train=False)
  with pytest.raises(BadSample) as e:
    next(it)
  assert e.value.reason == reason
  assert path in e.value.source


def test_eval_fixed_q_source_order_padded_last_batch(clean_ds, tok):
  root, path = clean_ds
  it = pl.make_pipeline(_cfg(path, root, batch_size=4, eval_q=4), tok, process_index=0,
                        process_count=1, train=False)
  batches = list(it)
  assert [b["latent_pos"].shape for b in batches] == [(4, 1, 8)] * 3
  assert [i for b in batches for i in batch_sample_ids(b, tok)] == list(range(11))
  last = batches[-1]
  assert not last["token_mask"][3].any() and (last["labels"][3] == -100).all()
  assert last["image_start"][3, 0] == -1 and not last["has_image"][3, 0]
  check_batch(last)


def test_worker_processes_counters_and_resume(tmp, tok):
  root = os.path.join(tmp, "mp")
  extra = [{"id": "x", "conversations": [{"from": "human", "value": "no answer"}]},
           {"id": "y", "image": "img/nope.png", "conversations": [
               {"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "answer 99"}]}]
  path = write_dataset(root, 12, extra=extra)
  cfg = _cfg(path, root, num_epochs=1, worker_count=2, prefetch=2)
  it = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  first = [next(it) for _ in range(2)]
  state = json.loads(json.dumps(it.get_state()))
  rest = list(it)
  it.close()
  ids = [i for b in first + rest for i in batch_sample_ids(b, tok)]
  assert sorted(ids) == list(range(12))
  assert it.skip_counters() == {"no_answer_turn": 1, "missing_image": 1}
  assert it.counters["samples"] == 12
  it2 = pl.make_pipeline(cfg, tok, process_index=0, process_count=1)
  it2.set_state(state)
  rest2 = list(it2)
  it2.close()
  assert len(rest2) == len(rest)
  for a, b in zip(rest, rest2):
    assert_batches_equal(a, b)
  assert it2.counters == it.counters


def test_to_global_batch_shards_the_batch_dim(clean_ds, tok):
  root, path = clean_ds
  it = pl.make_pipeline(_cfg(path, root, batch_size=8), tok, process_index=0, process_count=1)
  host = next(it)
  mesh = make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  glob = to_global_batch(host, mesh)
  assert set(glob) == set(host)
  for k, v in glob.items():
    assert isinstance(v, jax.Array) and v.shape == host[k].shape
    assert v.sharding.spec[0] == ("data", "fsdp")
    np.testing.assert_array_equal(np.asarray(v), host[k])
  assert len(glob["images"].addressable_shards[0].data) == 1  # 8 rows over 8 devices


def test_data_config_validation():
  cd = ml_collections.ConfigDict({"paths": ["a.json"], "query_len": [4, 16], "batch_size": 4})
  cfg = pl.DataConfig.from_dict(cd)
  assert cfg.paths == ("a.json",) and cfg.query_len == (4, 16) and cfg.q_eval == 16
  assert pl.DataConfig.from_dict(cfg.to_dict()) == cfg
  assert pl.DataConfig(query_len="4,36").query_len == (4, 36)
  with pytest.raises(ValueError, match="unknown keys"):
    pl.DataConfig.from_dict({"pathz": ["a.json"]})
  with pytest.raises(ValueError, match="perfect square"):
    pl.DataConfig(query_len=(4, 10))
  with pytest.raises(ValueError, match="only one of"):
    pl.DataConfig(paths=("a.json",), mixture="m.yaml")


def test_unknown_template_fails_at_startup(clean_ds, tok):
  root, path = clean_ds
  with pytest.raises(ValueError, match="template"):
    pl.make_pipeline(_cfg(path, root, template="vicuna"), tok, process_index=0,
                     process_count=1)


def test_skip_aware_batch_counts_trailing_skips(tmp, tok):
  # Skips after the last good sample still reach the counters (in an empty batch).
  root = os.path.join(tmp, "tail")
  rec = good_record(0, image=False)
  bad = {"id": "z", "conversations": [{"from": "human", "value": "no answer"}]}
  path = write_dataset(root, 0, extra=[rec, bad, bad])
  it = pl.make_pipeline(_cfg(path, root, batch_size=1), tok, process_index=0,
                        process_count=1, train=False)
  assert len(list(it)) == 1
  assert it.skip_counters() == {"no_answer_turn": 2}
