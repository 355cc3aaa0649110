"""LLM and VLM-filter backends against a scripted OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

import json
import os
import re
import shlex
import time

import numpy as np
import pytest

from fusion_jax.synth import __main__ as cli
from fusion_jax.synth import scene as S
from fusion_jax.synth.backends import BackendConfig
from fusion_jax.synth.categories import CATEGORIES
from fusion_jax.synth.llm_backend import (PROMPT_DIR, LLMBackend, Malformed, Prompts, parse_qa,
                                          slug)
from fusion_jax.synth.openai_client import (METER, BudgetExhausted, ChatClient, RequestFailed,
                                            RequestRejected)
from fusion_jax.synth.records import Turn, closed
from fusion_jax.synth.rejection import ItemRejected
from fusion_jax.synth.vlm_filter import VLMFilter
from synth_fake_server import generate_image, server  # noqa: F401 (fixture)
from synth_records import validate_record

FAST = {"backoff_s": 0.01, "max_backoff_s": 1.0}


def _chat(client: ChatClient) -> str:
  return client.chat([{"role": "user", "content": "Description: a red ball"}], seed=1)


def test_client_retries_timeouts_429_and_5xx_with_backoff(server):
  server.faults = [("status", 500), ("status", 429, 0.3), ("delay", 2.5), ("raw", b"<html>")]
  client = ChatClient(server.url, "m", timeout_s=1.0, max_retries=4, **FAST)
  t0 = time.perf_counter()
  reply = _chat(client)
  assert json.loads(reply)["qa"][0]["answer"] in S.COLORS
  assert time.perf_counter() - t0 >= 0.3 + 1.0  # Retry-After honoured, the slow reply waited on
  snap = METER.snapshot()
  assert snap["requests"] == 5
  assert snap["retries"] == {"bad_envelope": 1, "http_429": 1, "http_5xx": 1, "timeout": 1}
  payload = server.requests[0]
  assert payload["model"] == "m" and payload["seed"] == 1 and "response_format" not in payload


def test_client_gives_up_or_rejects(server):
  server.faults = [("status", 503)] * 3
  with pytest.raises(RequestFailed, match="3 attempts") as e:
    _chat(ChatClient(server.url, "m", max_retries=2, **FAST))
  assert e.value.reason == "http_5xx"
  server.faults = [("status", 400)]
  with pytest.raises(RequestRejected, match="HTTP 400"):
    _chat(ChatClient(server.url, "m", max_retries=5, **FAST))
  assert len(server.requests) == 4  # a 400 is not retried
  with pytest.raises(ValueError, match="http://"):
    ChatClient("localhost:8000/v1", "m")


def test_request_budget_is_never_exceeded(server):
  client = ChatClient(server.url, "m", **FAST)
  METER.reset(budget=2)
  _chat(client), _chat(client)
  with pytest.raises(BudgetExhausted):
    _chat(client)
  assert len(server.requests) == 2 and METER.exhausted()


def _qa(*items, fence: bool = False) -> str:
  text = json.dumps({"qa": list(items)})
  return f"```json\n{text}\n```" if fence else text


COLOUR_QA = {"question": "What colour is it?", "answer": "Red", "candidates": ["red", "blue"],
             "answer_type": "color"}


@pytest.mark.parametrize("reply,match", [
    ("Sure! " + _qa(COLOUR_QA), "not a JSON object"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"qa": []}), "non-empty list"),
    (_qa(COLOUR_QA, dict(COLOUR_QA, question="Again?")), "needs 1-1 turns"),
    (_qa(dict(COLOUR_QA, answer="green")), "not one of"),
    (_qa(dict(COLOUR_QA, candidates=["red", "Red"])), "distinct"),
    (_qa(dict(COLOUR_QA, candidates="red")), "list of non-empty strings"),
    (_qa(dict(COLOUR_QA, answer_type="hue")), "answer_type"),
    (_qa(dict(COLOUR_QA, answer="")), "'answer' must be"),
    (_qa({"question": "Describe it.", "answer": "A red ball."}), "closed question"),
])
def test_parse_qa_rejects_malformed_replies(reply, match):
  with pytest.raises(Malformed, match=match):
    parse_qa(reply, "SynthColor", np.random.default_rng(0))


def test_parse_qa_accepts_and_normalises():
  rng = np.random.default_rng(0)
  (t,) = parse_qa(_qa(COLOUR_QA, fence=True), "SynthColor", rng)
  assert (t.answer, t.qa["candidates"], t.qa["kind"]) == ("red", ["red", "blue"], "llm")
  conv = parse_qa(_qa(COLOUR_QA, dict(COLOUR_QA, question="And the ball?", answer="blue"),
                      {"question": "Describe the picture.", "answer": "A red ball."}),
                  "SynthConvLong", rng)
  assert [t.qa is None for t in conv] == [False, False, True]
  (t,) = parse_qa(_qa({"question": "How many?", "answer": 3, "candidates": [1, 2, 3],
                       "answer_type": "count"}), "SynthCount", rng)
  assert (t.answer, t.qa["candidates"]) == ("3", ["1", "2", "3"])
  (t, u) = parse_qa(_qa(COLOUR_QA, {"question": "Why?", "answer": "Sun.", "candidates": None}),
                    "SynthConvShort", rng)
  assert u.qa is None
  with pytest.raises(Malformed, match="open question"):
    parse_qa(_qa(COLOUR_QA, dict(COLOUR_QA, question="B?"), dict(COLOUR_QA, question="C?")),
             "SynthConvLong", rng)
  # Multiple choice: the correct option lands on every letter, whatever the LLM's order.
  mc = _qa({"question": "Which colour?", "options": ["red", "blue", "green", "pink"],
            "answer": "red"})
  letters = set()
  for _ in range(40):
    (t,) = parse_qa(mc, "SynthMultiChoice", rng)
    assert t.qa["options"][["A", "B", "C", "D"].index(t.answer)] == "red"
    assert "\nA. " in t.question and t.qa["candidates"] == ["A", "B", "C", "D"]
    letters.add(t.answer)
  assert letters == {"A", "B", "C", "D"}


def test_prompts_cover_every_category_and_can_be_overridden(tmp_path):
  p = Prompts()
  for c in CATEGORIES:
    assert os.path.exists(os.path.join(PROMPT_DIR, f"ask_{slug(c)}.md")) and p.focus(c)
  (tmp_path / "ask_color.md").write_text("Colour question. $format\nDescription: $description")
  user = Prompts(str(tmp_path))
  assert user.render("ask_color.md", format="F", description="D") == \
      "Colour question. F\nDescription: D"
  assert user.path("describe.md") == os.path.join(PROMPT_DIR, "describe.md")
  (tmp_path / "describe.md").write_text("Expand $caption with $focuss")
  assert user.fingerprint() != Prompts(str(tmp_path)).fingerprint() != p.fingerprint()
  with pytest.raises(ValueError, match="describe.md: bad placeholder"):
    Prompts(str(tmp_path)).render("describe.md", caption="c", focus="f")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Prompts(str(tmp_path / "missing"))


def test_llm_backend_describes_asks_and_rejects_malformed(server):
  backend = LLMBackend(server.url, "m", parse_retries=1, **FAST)
  rng = np.random.default_rng(3)
  server.faults = [("text", "Here you go: a red circle.")]  # malformed, then a good reply
  d = backend.describe("SynthColor", rng)
  assert d.category == "SynthColor" and "circle" in d.caption and d.focus["seed_caption"]
  assert server.count("describe") == 2
  assert server.requests[0]["response_format"] == {"type": "json_object"}
  assert server.requests[0]["seed"] != server.requests[1]["seed"]
  (t,) = backend.ask(d, rng)
  assert t.qa["answer_type"] == "color" and t.answer in S.COLORS
  server.faults = [("text", "{\"qa\": 3}"), ("text", "no")]
  with pytest.raises(ItemRejected, match="malformed_qa") as e:
    backend.ask(d, rng)
  assert e.value.reason == "malformed_qa" and "not a JSON object" in e.value.detail
  assert METER.snapshot()["retries"] == {"malformed_description": 1, "malformed_qa": 1}
  server.faults = [("status", 413)]
  with pytest.raises(ItemRejected, match="request_rejected"):
    backend.describe("SynthColor", rng)


def test_llm_backend_contrast_and_caption_pool(server, tmp_path):
  pool = tmp_path / "captions.jsonl"
  pool.write_text('{"caption": "a blue kite"}\n\n{"caption": "a blue kite"}\n')
  backend = LLMBackend(server.url, "m", seed_captions=str(pool), **FAST)
  server.faults = [("text", json.dumps({"left": "A blue kite.", "right": "A red kite.",
                                        "difference": "The kite's colour."}))]
  d = backend.describe("SynthContrastShort", np.random.default_rng(0))
  assert d.focus["panel_prompts"] == ["A blue kite.", "A red kite."]
  assert "a blue kite" in server.requests[0]["messages"][0]["content"]
  server.faults = [("text", _qa({"question": "What changed?", "answer": "color",
                                 "candidates": ["color", "shape", "count", "position", "size"],
                                 "answer_type": "difference"}))]
  (t,) = backend.ask(d, np.random.default_rng(0))
  assert t.answer == "color"
  ask_prompt = server.requests[-1]["messages"][0]["content"]
  assert "Left image: A blue kite." in ask_prompt and "The kite's colour." in ask_prompt
  (tmp_path / "empty.txt").write_text("\n")
  with pytest.raises(ValueError, match="no captions"):
    LLMBackend(server.url, "m", seed_captions=str(tmp_path / "empty.txt"))


def _colour_item(colour: str, answer: str) -> tuple[S.Description, list[Turn], np.ndarray]:
  desc = S.Description("SynthColor", f"A large {colour} circle.")
  turns = [Turn("<image>\nWhat colour is the circle?", answer,
                closed(answer, "color", S.COLORS, "llm"))]
  return desc, turns, generate_image(colour, 32, 5)


@pytest.mark.parametrize("mode", ["answer", "verify"])
def test_vlm_filter_votes_k_of_n(server, mode):
  f = VLMFilter(server.url, "vlm", votes=3, min_yes=2, mode=mode, **FAST)
  assert f.check(*_colour_item("green", "green")) is None
  assert len(server.requests) == 2  # decided after two yes votes
  content = server.requests[0]["messages"][0]["content"]
  assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
  assert "<image>" not in content[1]["text"]
  n = len(server.requests)
  assert f.check(*_colour_item("green", "blue")) == "vlm_disagree"
  assert len(server.requests) - n == 2  # two no votes: min_yes is out of reach
  # Malformed votes are abstentions; too many of them reject with their own reason.
  server.faults = [("text", "yes!"), ("text", "{}")]
  assert f.check(*_colour_item("green", "green")) == "vlm_malformed"
  server.faults = [("text", "maybe"), ("status", 500)]
  assert f.check(*_colour_item("green", "green")) is None  # 1 abstention, then 2 yes
  # The base filter runs first and costs no request.
  n = len(server.requests)
  desc, turns, image = _colour_item("green", "green")
  assert f.check(desc, turns, np.zeros_like(image)) == "degenerate"
  assert len(server.requests) == n
  with pytest.raises(ValueError, match="min_yes"):
    VLMFilter(server.url, "vlm", votes=2, min_yes=3)


def test_cli_end_to_end_llm_and_vlm_filter(server, tmp_path, capsys):
  backends = tmp_path / "t2i.json"
  backends.write_text(json.dumps({"renderer": {
      "path": "fusion_jax.synth.backends:TextToImageRenderer",
      "kwargs": {"generate_image": "synth_fake_server:generate_image"}}}))
  out = str(tmp_path / "out")
  cli.main(["--out", out, "--num", "8", "--size", "48", "--categories", "SynthColor",
            "--backends", str(backends), "--llm-url", server.url, "--llm-model", "llm",
            "--filter-url", server.url, "--filter-model", "vlm", "--filter-votes", "1",
            "--filter-min-yes", "1", "--concurrency", "4", "--progress-every", "0"])
  stats = json.load(open(os.path.join(out, "stats.json")))
  assert stats["complete"] and stats["records"] == 8
  assert stats["rejected"]["vlm_disagree"] > 0  # the scripted LLM lies on every 4th seed
  assert sum(stats["rejected"].values()) + 8 + stats["unused_surplus"] == stats["generated"]
  assert stats["config"]["backends"]["filter"]["kwargs"]["votes"] == 1
  recs = json.load(open(os.path.join(out, "train.json"))) + \
      json.load(open(os.path.join(out, "heldout.json")))
  for r in recs:
    validate_record(r)
    assert r["qa"][0]["answer"] in r["caption"]  # every lie was filtered out
  err = capsys.readouterr().err
  assert "items/s" in err and "rejected" in err and "vlm_disagree" in err
  with pytest.raises(ValueError, match="--llm-model"):
    cli.main(["--out", out, "--num", "8", "--llm-url", server.url])


def test_documented_vllm_flux_command_parses():
  doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                          "synth.md")).read()
  block = re.search(r"### End to end: vLLM \+ FLUX.1-dev\n\n```bash\n(.*?)```", doc, re.S)
  command = block.group(1).split("python -m fusion_jax.synth", 1)[1].replace("\\\n", " ")
  args = cli.parse_args(shlex.split(command))
  assert cli.use_sharded(args) and args.t2i_pipeline == "/models/FLUX.1-dev"
  stages = cli.model_backends(args, BackendConfig()).to_dict()
  assert stages["describer"] == stages["asker"]
  assert stages["asker"]["kwargs"]["model"] == "Qwen/Qwen2.5-72B-Instruct"
  assert stages["renderer"]["kwargs"]["batch_size"] == 4
  assert stages["filter"]["kwargs"]["base_filter"]["path"].endswith("ProceduralFilter")
