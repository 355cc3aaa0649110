"""lmms-eval model `fusion_jax`: request handling with stand-ins of lmms-eval's Instance, its
registration (entry point + lmms subclass), and the fallback route through the OpenAI-compatible
server with the requests lmms-eval's `openai` model sends; all without installing lmms-eval
(it would replace this project's torch).
"""
import base64
import dataclasses
import importlib
import io
import json
import os
import sys
import tomllib
import types
import urllib.request

import jax
import numpy as np
import pytest
from PIL import Image

from fusion_jax.eval import bench_model, closed_qa
from fusion_jax.eval import lmms_eval_model as lem
from fusion_jax.models import fusion
from fusion_jax.models.batch_spec import stack_examples
from tests.bench_fixtures import tiny_model_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Instance:
  """lmms_eval.api.instance.Instance's request fields (lmms-eval 0.7.3, commit 75571cf)."""
  request_type: str
  arguments: tuple
  idx: int
  metadata: dict = dataclasses.field(default_factory=dict)

  @property
  def args(self):
    return self.arguments if isinstance(self.arguments, tuple) else (self.arguments,)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("lmms"))
  m = lem.FusionJax(pretrained=tiny_model_dir(root), batch_size="2", device="cuda")
  # lmms-eval fills task_dict with each task's dataset: {task: {split: docs}}
  docs = [{"image": Image.new("RGB", (30, 20), (200, 30, 30)), "question": "What color?"},
          {"image": Image.new("RGB", (20, 30), (30, 30, 200)), "question": "How many balls?"}]
  m.task_dict = {"toy": {"test": docs}}
  return m


def _visual(doc):
  return [doc["image"]]


def test_generate_until_requests(lm, monkeypatch):
  docs = lm.task_dict["toy"]["test"]
  gk = {"max_new_tokens": 4, "temperature": 0, "until": ["ASSISTANT:"]}
  reqs = [Instance("generate_until", ("What color is the ball?", gk, _visual, 0, "toy", "test"), 0),
          Instance("generate_until", ("How many balls?", gk, _visual, 1, "toy", "test"), 1)]
  out = lm.generate_until(reqs)  # the real model: greedy, images from task_dict
  ref = bench_model.generate(lm.model, [("What color is the ball?", docs[0]["image"]),
                                        ("How many balls?", docs[1]["image"])],
                             max_new_tokens=4, batch_size=2)
  assert out == ref and all(isinstance(a, str) for a in out)

  # Request handling, with the generator replaced by a recorder: one pass per (max_new_tokens,
  # stop strings), answers back in request order, '' for a refused prompt.
  calls = {}

  def fake_generate(model, prompts, *, max_new_tokens, stop, batch_size):
    calls[(max_new_tokens, stop)] = (batch_size, [(t, im()) for t, im in prompts])  # lazy images
    return [bench_model.Refused("too long") if t == "too long" else t.upper()
            for t, _ in prompts]

  monkeypatch.setattr(bench_model, "generate", fake_generate)
  reqs = [Instance("generate_until", ("a", gk, _visual, 1, "toy", "test"), 0),
          Instance("generate_until", ("b", {"max_new_tokens": 7, "until": "|"}, None, 0, "toy",
                                      "test"), 1),
          Instance("generate_until", ("c", {"until": ["x", "more"]}, _visual, 0, "toy", "test"), 2),
          Instance("generate_until", ("too long", gk, _visual, 0, "toy", "test"), 3)]
  assert lm.generate_until(reqs) == ["A", "B", "C", ""]
  assert sorted(calls) == [(4, ("ASSISTANT:",)), (7, ("|",)), (128, ("x", "more"))]
  batch_size, prompts = calls[(4, ("ASSISTANT:",))]
  assert batch_size == 2
  assert prompts == [("a", docs[1]["image"]), ("too long", docs[0]["image"])]
  assert calls[(7, ("|",))][1] == [("b", None)]


def test_loglikelihood_matches_candidate_scoring(lm):
  ctx = "What color is the ball?"
  cands = ["red", "blue ball"]
  broken = os.path.join(os.path.dirname(lm.model.path), "broken.png")
  with open(broken, "wb") as f:
    f.write(b"not a png")
  reqs = [Instance("loglikelihood", (ctx, cands[0], _visual, 0, "toy", "test"), 0),
          Instance("loglikelihood", (ctx, lambda doc: cands[1], _visual, 0, "toy", "test"), 1),
          Instance("loglikelihood", (ctx, "red", lambda doc: [broken], 0, "toy", "test"), 2)]
  out = lm.loglikelihood(reqs)
  assert out[2] == (float("-inf"), False)  # an undecodable image: refused, not a crash
  out = out[:2]
  assert all(isinstance(lp, float) and isinstance(g, bool) for lp, g in out)
  # closed_qa's candidate scoring of the same conversation (its own layout, seq_len, batch)
  m = lm.model
  img = os.path.join(os.path.dirname(m.path), "toy.png")
  lm.task_dict["toy"]["test"][0]["image"].save(img)
  rec = {"id": "r", "image": img, "conversations": [
      {"from": "human", "value": "<image>\n" + ctx}, {"from": "gpt", "value": cands[0]}],
      "qa": [{"answer": cands[0], "candidates": cands}]}
  qs = closed_qa.closed_questions([rec])
  exs, owners, _ = closed_qa.build_examples(
      [rec], qs, m.tokenizer, template=m.cfg.template, q=m.q,
      num_image_tokens=m.cfg.num_image_tokens, seq_len=256, max_questions=1,
      max_instruct_len=m.cfg.max_instruct_len)
  ref = closed_qa.score_examples(m.params, m.cfg, exs,
                                 closed_qa.image_loader([rec], "", m.cfg.vision.image_size),
                                 batch_size=2)
  np.testing.assert_allclose([lp for lp, _ in out], ref, rtol=1e-4, atol=1e-4)
  # is_greedy: every continuation token is the full forward's argmax
  image = closed_qa.image_loader([rec], "", m.cfg.vision.image_size)(0)
  batch = stack_examples([{**{k: v for k, v in e.items() if k != "record_index"},
                           "images": image} for e in exs])
  logits, _ = jax.jit(lambda p, b: fusion.apply(p, b, m.cfg, train=False))(m.params, batch)
  pred = np.argmax(np.asarray(logits)[:, :-1], -1)
  labels = batch["labels"][:, 1:]
  expect = [bool(np.all(pred[i][labels[i] >= 0] == labels[i][labels[i] >= 0])) for i in range(2)]
  assert [g for _, g in out] == expect


def test_registration_entry_point_and_lmms_subclass(monkeypatch):
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    eps = tomllib.load(f)["project"]["entry-points"]["lmms_eval.models"]
  assert eps == {"fusion_jax": "fusion_jax.eval.lmms_eval_model:manifest"}

  # Stand-ins for the lmms-eval modules the plugin touches (lmms base, registry, manifest).
  class lmms:  # noqa: N801 - lmms-eval's name
    is_simple = True

    def __init__(self):
      self._rank, self._world_size, self.task_dict, self.cache_hook = 0, 1, {}, None

  registered = {}

  def register_model(*names):
    def deco(cls):
      assert issubclass(cls, lmms)
      registered.update({n: cls for n in names})
      return cls
    return deco

  @dataclasses.dataclass(frozen=True)
  class ModelManifest:
    model_id: str
    simple_class_path: str | None = None
    chat_class_path: str | None = None

  mods = {"lmms_eval": types.ModuleType("lmms_eval"),
          "lmms_eval.api": types.ModuleType("lmms_eval.api"),
          "lmms_eval.api.model": types.SimpleNamespace(lmms=lmms),
          "lmms_eval.api.registry": types.SimpleNamespace(register_model=register_model),
          "lmms_eval.models": types.ModuleType("lmms_eval.models"),
          "lmms_eval.models.registry_v2": types.SimpleNamespace(ModelManifest=ModelManifest)}
  for name, mod in mods.items():
    monkeypatch.setitem(sys.modules, name, mod)
  try:
    mod = importlib.reload(lem)
    assert issubclass(mod.FusionJax, lmms) and mod.FusionJax.is_simple
    assert registered == {"fusion_jax": mod.FusionJax}
    man = importlib.import_module("fusion_jax.eval.lmms_eval_model").manifest()
    assert man.model_id == "fusion_jax" and man.chat_class_path is None
    module, cls = man.simple_class_path.rsplit(".", 1)
    assert getattr(importlib.import_module(module), cls) is mod.FusionJax
  finally:
    monkeypatch.undo()
    importlib.reload(lem)
  assert not issubclass(lem.FusionJax, lmms)


def openai_payload(context, image, gen_kwargs, model_version="fusion_jax"):
  """The request lmms-eval's `openai` model sends for a generate_until request
  (lmms_eval/models/simple/openai.py, build_payload_for_index, commit 75571cf): the text part,
  then each visual as a PNG data URL; max_tokens = max_new_tokens (default 1024); no stop."""
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
  return {"model": model_version,
          "messages": [{"role": "user", "content": [
              {"type": "text", "text": context},
              {"type": "image_url", "image_url": {"url": url}}]}],
          "max_tokens": gen_kwargs.get("max_new_tokens", 1024),
          "temperature": gen_kwargs.get("temperature", 0)}


def test_openai_server_route_answers_like_the_model_class(lm):
  from fusion_jax.infer.generator import Generator
  from fusion_jax.serve.batcher import Batcher
  from fusion_jax.serve.chat import ChatLimits
  from fusion_jax.serve.server import FusionServer
  m = lm.model
  # the generator settings of bench_model.generate (one question per prompt): shared compiles
  gen = Generator(m.params, m.cfg, m.tokenizer, q=m.q, max_questions=1, max_seq_len=m.seq_len,
                  max_batch=2, max_new_tokens=4)
  srv = FusionServer(("127.0.0.1", 0), Batcher(gen), model_name=m.name,
                     limits=ChatLimits(image_size=m.cfg.vision.image_size))
  srv.start()
  try:
    docs = lm.task_dict["toy"]["test"]
    ctx = "What color is the ball?\nAnswer the question using a single word or phrase."
    body = json.dumps(openai_payload(ctx, docs[0]["image"], {"max_new_tokens": 4})).encode()
    # lmms-eval: --model openai --model_args model_version=...,base_url=<server>/v1
    req = urllib.request.Request(srv.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Bearer EMPTY"})
    with urllib.request.urlopen(req, timeout=300) as r:
      reply = json.loads(r.read())
  finally:
    srv.shutdown()
    srv.server_close()
  text = reply["choices"][0]["message"]["content"]  # what lmms-eval's openai model reads
  assert text == lm.generate_until([Instance("generate_until", (
      ctx, {"max_new_tokens": 4}, _visual, 0, "toy", "test"), 0)])[0]


def test_seq_len_model_arg(lm):
  # model_args arrive as strings; seq_len as the commands' --seq_len
  m = lem.FusionJax(pretrained=lm.model.path, seq_len="256")
  assert m.model.seq_len == 256 != lm.model.seq_len
