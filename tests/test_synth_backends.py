"""User backends by import path: the worked examples of docs/synth.md, run as written."""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys

import numpy as np
import pytest

from fusion_jax.synth import __main__ as cli
from fusion_jax.synth.backends import (BackendConfig, BackendSpec, LLMWriter, load_object,
                                       parse_qa_json)
from fusion_jax.synth.pipeline import SynthConfig, synthesize
from synth_records import validate_record

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                   "synth.md")


def _blocks(lang: str) -> list[str]:
  text = open(DOC).read()
  return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


def _json_block(key: str) -> dict:
  return next(json.loads(b) for b in _blocks("json") if key in b)


def _tree(out: str) -> dict[str, str]:
  h = {}
  for root, _, names in os.walk(out):
    for n in names:
      p = os.path.join(root, n)
      if n != "stats.json":  # records the backend config, which differs by construction
        h[os.path.relpath(p, out)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
  return h


def _records(out: str) -> list[dict]:
  return json.load(open(os.path.join(out, "train.json"))) + \
      json.load(open(os.path.join(out, "heldout.json")))


def test_procedural_backend_through_the_interface(tmp_path):
  cfg_path = tmp_path / "procedural.json"
  cfg_path.write_text(json.dumps(_json_block("ProceduralRenderer")))
  a, b = str(tmp_path / "default"), str(tmp_path / "via")
  cli.main(["--out", a, "--num", "24", "--size", "64", "--quiet"])
  cli.main(["--out", b, "--num", "24", "--size", "64", "--quiet", "--backends", str(cfg_path)])
  assert _tree(a) == _tree(b)
  stats = json.load(open(os.path.join(b, "stats.json")))
  assert stats["config"]["backends"]["renderer"]["kwargs"] == {"noise": True}


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  """docs/synth.md's my_generators.py, importable by its import path."""
  code = next(b for b in _blocks("python") if b.startswith("# my_generators.py"))
  (tmp_path / "my_generators.py").write_text(code)
  monkeypatch.syspath_prepend(str(tmp_path))
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # for spawned workers
  yield "my_generators"
  sys.modules.pop("my_generators", None)


def test_llm_and_text_to_image_backends(tmp_path, user_module):
  cfg_path = tmp_path / "llm.json"
  cfg_path.write_text(json.dumps(_json_block("LLMWriter")))
  out = str(tmp_path / "llm")
  cli.main(["--out", out, "--num", "12", "--size", "96", "--categories", "SynthColor",
            "--backends", str(cfg_path), "--quiet"])
  recs = _records(out)
  assert len(recs) == 12
  for r in recs:
    validate_record(r)
    assert r["caption"].endswith("The picture is sharp and evenly lit.")
    assert r["qa"][0]["answer"] in r["caption"]
  # Same output with two workers (backends are rebuilt from their import paths per worker).
  out2 = str(tmp_path / "llm2")
  synthesize(SynthConfig(out=out2, num=12, size=96, categories=("SynthColor",), workers=2,
                         backends=BackendConfig.from_json_file(str(cfg_path)), progress=False))
  assert _tree(out) == _tree(out2)


def test_llm_replies_that_break_the_format_are_rejected(tmp_path):
  replies = iter(["A red circle.", "not json at all", "A blue square.",
                  json.dumps([{"question": "Colour?", "answer": "teal",
                               "candidates": ["red", "blue"], "answer_type": "color"}])])
  writer = LLMWriter(lambda prompt, seed: next(replies))
  rng = np.random.default_rng(0)
  from fusion_jax.synth.filter import check_item
  image = np.full((32, 32, 3), 7, np.uint8)
  image[0, 0] = 9
  d = writer.describe("SynthColor", rng)
  assert d.caption == "A red circle." and not d.panels
  assert check_item(d, writer.ask(d, rng), image) == "degenerate"  # no parsable turns
  d = writer.describe("SynthColor", rng)
  assert check_item(d, writer.ask(d, rng), image) == "degenerate"  # answer not a candidate
  turns = parse_qa_json('Sure! [{"question": "Q?", "answer": "yes", "candidates": ["yes", "no"],'
                        ' "answer_type": "yes_no"}, {"question": "Why?", "answer": "because"}]')
  assert turns[0].qa["candidates"] == ["yes", "no"] and turns[1].qa is None
  assert check_item(d, turns, image) is None


def test_backend_loading_errors_name_the_problem():
  assert load_object("fusion_jax.synth.scene:PALETTE")["red"] == (215, 35, 35)
  with pytest.raises(ImportError, match="no_such_module"):
    load_object("no_such_module:Thing")
  with pytest.raises(AttributeError, match="Nope"):
    load_object("fusion_jax.synth.scene:Nope")
  with pytest.raises(TypeError, match="render"):
    BackendSpec("fusion_jax.synth.describe:ProceduralDescriber").build("renderer")
  with pytest.raises(ValueError, match="unknown stage"):
    BackendConfig.from_dict({"painter": "x:y"})
  with pytest.raises(ValueError, match="unknown synthesis category"):
    SynthConfig(out="/tmp/x", num=1, categories=("SynthColour",))
