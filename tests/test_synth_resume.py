"""The resumable sharded engine: interrupted runs continue, limits hold, failures are retried."""
from __future__ import annotations

import json
import os

import pytest

from fusion_jax.synth import __main__ as cli
from fusion_jax.synth.shards import ShardStore
from synth_fake_server import server  # noqa: F401 (fixture)

NUM = 6


@pytest.fixture
def backends_file(tmp_path):
  p = tmp_path / "t2i.json"
  p.write_text(json.dumps({"renderer": {
      "path": "fusion_jax.synth.backends:TextToImageRenderer",
      "kwargs": {"generate_image": "synth_fake_server:generate_image"}}}))
  return str(p)


def _run(server, out, backends_file, *extra) -> dict:
  cli.main(["--out", out, "--num", str(NUM), "--size", "32", "--categories",
            "SynthColor,SynthCount", "--backends", backends_file, "--llm-url", server.url, "--llm-model",
            "llm", "--max-retries", "1", "--request-timeout", "5", "--concurrency", "3",
            "--retry-backoff", "0.01", "--quiet", *extra])
  stats = json.load(open(os.path.join(out, "stats.json")))
  with open(os.path.join(out, "run_log.jsonl")) as f:
    stats["this_run"] = json.loads(f.read().splitlines()[-1])
  return stats


def _dataset(out: str) -> tuple[str, str]:
  return tuple(open(os.path.join(out, f"{n}.json")).read() for n in ("train", "heldout"))


def _indices(out: str) -> list[int]:
  return sorted(ShardStore(out, 1000).load())


def test_interrupted_run_continues_without_redoing_items(server, tmp_path, backends_file):
  ref = str(tmp_path / "ref")
  full = _run(server, ref, backends_file)
  assert full["complete"] and full["records"] == NUM
  n_ref = len(server.requests)

  out = str(tmp_path / "out")
  part = _run(server, out, backends_file, "--max-items", "3")
  assert not part["complete"] and part["this_run"]["items"] == 3
  assert "max_items" in part["incomplete"]["stopped"]
  assert len(json.load(open(os.path.join(out, "train.json")))) <= 3  # partial dataset written
  first = _indices(out)
  rest = _run(server, out, backends_file)
  assert rest["complete"] and rest["this_run"]["items"] == len(_indices(out)) - len(first)
  # Same dataset as the uninterrupted run, and no item was asked for twice.
  assert _dataset(out) == _dataset(ref)
  assert len(server.requests) - n_ref == n_ref
  log = [json.loads(l) for l in open(os.path.join(out, "run_log.jsonl"))]
  assert [e["items"] for e in log] == [3, rest["this_run"]["items"]]
  # A finished run reruns for free.
  n = len(server.requests)
  again = _run(server, out, backends_file)
  assert again["this_run"]["items"] == 0 and len(server.requests) == n
  assert _dataset(out) == _dataset(ref)


def test_request_budget_stops_the_run_and_the_rerun_finishes(server, tmp_path, backends_file):
  out = str(tmp_path / "out")
  # One worker: with three, a fast first item can finish and start a fourth before the second
  # and third items' first requests go out, which leaves one item done instead of two.
  stats = _run(server, out, backends_file, "--budget-requests", "5", "--concurrency", "1")
  assert len(server.requests) == 5 and stats["this_run"]["requests"] == 5
  assert not stats["complete"] and "budget_requests" in stats["incomplete"]["stopped"]
  assert stats["this_run"]["items"] == 2  # two items of 2 requests each; the fifth is lost
  assert _run(server, out, backends_file)["complete"]


def test_failed_requests_leave_items_unfinished(server, tmp_path, backends_file):
  out = str(tmp_path / "out")
  server.faults = [("status", 503)] * 6  # every attempt of the first items fails
  stats = _run(server, out, backends_file, "--max-failures", "3", "--concurrency", "1")
  assert "3 failed requests in a row" in stats["incomplete"]["stopped"]
  assert stats["this_run"]["failed"] == {"http_5xx": 3} and _indices(out) == []
  assert stats["this_run"]["retries"] == {"http_5xx": 3}
  assert _run(server, out, backends_file)["complete"]


def test_torn_shard_line_and_changed_config(server, tmp_path, backends_file):
  out = str(tmp_path / "out")
  _run(server, out, backends_file, "--max-items", "4")
  shard = os.path.join(out, "shards", "shard-00000.jsonl")
  lines = open(shard).read().splitlines()
  with open(shard, "w") as f:  # a crash cut the last line short
    f.write("\n".join(lines[:-1]) + "\n" + lines[-1][:25])
  assert len(_indices(out)) == 3
  stats = _run(server, out, backends_file)
  assert stats["complete"] and stats["records"] == NUM
  assert all(json.loads(l) for l in open(shard).read().splitlines()[:3])
  with pytest.raises(ValueError, match="differs in: seed"):
    _run(server, out, backends_file, "--seed", "1")
  # Edited prompts make different items: refused too (the run keeps one prompt version).
  prompts = tmp_path / "prompts"
  prompts.mkdir()
  (prompts / "ask_count.md").write_text("$format\nDescription: $description")
  with pytest.raises(ValueError, match="fingerprints"):
    _run(server, out, backends_file, "--prompts", str(prompts))
  assert _run(server, out, backends_file, "--seed", "1", "--overwrite")["complete"]


def test_procedural_backend_through_the_sharded_engine(tmp_path):
  out = str(tmp_path / "proc")
  cli.main(["--out", out, "--num", "12", "--size", "64", "--sharded", "--quiet",
            "--categories", "SynthColor,SynthSpatial", "--concurrency", "2"])
  stats = json.load(open(os.path.join(out, "stats.json")))
  assert stats["complete"] and stats["records"] == 12
  with pytest.raises(FileExistsError, match="without shards"):
    other = str(tmp_path / "plain")
    cli.main(["--out", other, "--num", "4", "--size", "64", "--quiet"])
    cli.main(["--out", other, "--num", "4", "--size", "64", "--quiet", "--sharded"])
