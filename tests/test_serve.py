"""The OpenAI-compatible server, through a real HTTP client against a server on 127.0.0.1."""
import base64
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from fusion_jax.infer.generator import Generator
from fusion_jax.infer.load import load_model
from fusion_jax.serve.batcher import Batcher
from fusion_jax.serve.chat import ChatLimits
from fusion_jax.serve.server import FusionServer
from tests.model_fixtures import make_model_dir
from tests.pipeline_fixtures import png_bytes

MAX_TOKENS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("serve"))
  model_dir, _, _ = make_model_dir(root)
  images = os.path.join(root, "images")
  os.makedirs(images)
  with open(os.path.join(images, "a.png"), "wb") as f:
    f.write(png_bytes(200))
  with open(os.path.join(root, "secret.png"), "wb") as f:
    f.write(png_bytes(10))
  model = load_model(model_dir)
  gen = Generator.for_model(model, max_batch=4, max_new_tokens=8, stop_check_every=2)
  srv = FusionServer(("127.0.0.1", 0), Batcher(gen, window_s=0.3), model_name=model.name,
                     limits=ChatLimits(image_size=model.cfg.vision.image_size, image_root=images,
                                       max_image_bytes=100_000),
                     max_body_bytes=200_000)
  srv.start()
  yield dict(srv=srv, url=srv.url, root=root, model_dir=model_dir)
  srv.shutdown()
  srv.server_close()


def _call(url, path, body=None, raw=None):
  """(status, JSON body) of one request; `raw` bytes are sent as is."""
  data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
  req = urllib.request.Request(url + path, data=data,
                               headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(req, timeout=300) as r:
      return r.status, json.loads(r.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _data_url(value=200):
  return "data:image/png;base64," + base64.b64encode(png_bytes(value)).decode()


def _chat(text, image=None, **kw):
  content = [{"type": "text", "text": text}]
  if image:
    content.append({"type": "image_url", "image_url": {"url": image}})
  return {"model": "fusion", "messages": [{"role": "user", "content": content}],
          "max_tokens": MAX_TOKENS, **kw}


def test_health_and_models(server):
  assert _call(server["url"], "/health") [0] == 200
  status, body = _call(server["url"], "/v1/models")
  assert status == 200 and [m["id"] for m in body["data"]] == ["fusion_tiny"]


def test_chat_completion_with_images(server):
  status, body = _call(server["url"], "/v1/chat/completions",
                       _chat("What color is the ball?", _data_url()))
  assert status == 200, body
  choice = body["choices"][0]
  assert body["object"] == "chat.completion" and choice["message"]["role"] == "assistant"
  assert isinstance(choice["message"]["content"], str)
  assert choice["finish_reason"] in ("stop", "length")
  usage = body["usage"]
  assert usage["prompt_tokens"] > 16  # 16 image slots + latents + text
  assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
  assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
  # The same image as a file under --image_root (a path and a file:// URL) answers the same.
  for ref in ("a.png", "file://" + os.path.join(server["root"], "images", "a.png")):
    s2, b2 = _call(server["url"], "/v1/chat/completions", _chat("What color is the ball?", ref))
    assert s2 == 200 and b2["choices"][0] == choice, b2


def test_concurrent_requests_are_batched_and_answer_as_alone(server):
  bodies = [_chat("What color is the ball?", _data_url(200)), _chat("How many cats?"),
            _chat("Describe the scene.", _data_url(40)), _chat("Is the ball red?")]
  out = [None] * len(bodies)
  start = threading.Barrier(len(bodies))

  def worker(i):
    start.wait()
    out[i] = _call(server["url"], "/v1/chat/completions", bodies[i])

  before = server["srv"].batcher.stats.largest
  threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(s == 200 for s, _ in out), out
  assert server["srv"].batcher.stats.largest > max(before, 1)  # they shared a batch
  gen = server["srv"].batcher.generator
  from fusion_jax.serve.chat import chat_record, sampling_params
  limits = server["srv"].limits
  for body, (_, got) in zip(bodies, out):
    alone = gen.generate([chat_record(body, limits)], sampling_params(body, limits))[0]
    assert got["choices"][0]["message"]["content"] == alone.text
    assert got["usage"]["completion_tokens"] == alone.completion_tokens


def test_sampling_is_seeded(server):
  hot = _chat("Describe the scene.", temperature=1.0, top_p=0.9, top_k=20, seed=7,
              stop=["zzz"])
  a, b = (_call(server["url"], "/v1/chat/completions", hot) for _ in range(2))
  assert a[0] == b[0] == 200 and a[1]["choices"] == b[1]["choices"]


def test_stop_and_max_tokens_are_honoured(server):
  body = _chat("What color is the ball?", _data_url(), max_tokens=8)
  status, free = _call(server["url"], "/v1/chat/completions", body)
  text = free["choices"][0]["message"]["content"]
  assert status == 200 and text.strip(), free
  stop = text.strip()[-1]
  status, cut = _call(server["url"], "/v1/chat/completions", {**body, "stop": [stop]})
  assert status == 200
  assert cut["choices"][0]["message"]["content"] == text[:text.find(stop)].strip()
  assert cut["choices"][0]["finish_reason"] == "stop"
  status, short = _call(server["url"], "/v1/chat/completions", {**body, "max_tokens": 1})
  assert short["usage"]["completion_tokens"] == 1


def _stream(url, body):
  """(content type, the events' data strings) of one streamed request."""
  req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=300) as r:
    text = r.read().decode()
    ctype = r.headers["Content-Type"]
  events = [e for e in text.split("\n\n") if e]
  assert all(e.startswith("data: ") for e in events), text
  return ctype, [e[len("data: "):] for e in events]


@pytest.mark.parametrize("extra", [{}, {"stop": ["zz"], "temperature": 0.8, "seed": 5}])
def test_streamed_answer_equals_the_plain_one(server, extra):
  body = _chat("What color is the ball?", _data_url(), max_tokens=8, **extra)
  status, plain = _call(server["url"], "/v1/chat/completions", body)
  assert status == 200, plain
  ctype, events = _stream(server["url"], {**body, "stream": True,
                                          "stream_options": {"include_usage": True}})
  assert ctype == "text/event-stream" and events[-1] == "[DONE]"
  chunks = [json.loads(e) for e in events[:-1]]
  assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"]
             for c in chunks)
  assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
  text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[1:-2])
  assert text == plain["choices"][0]["message"]["content"]
  assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "logprobs": None,
                                      "finish_reason": plain["choices"][0]["finish_reason"]}
  assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == plain["usage"]
  # Without include_usage: no usage chunk; the connection is reusable (chunked body ended).
  _, events = _stream(server["url"], {**body, "stream": True})
  assert events[-1] == "[DONE]" and "usage" not in json.loads(events[-2])


@pytest.mark.parametrize("body,raw,match", [
    (None, b"{not json", "not valid JSON"),
    (None, b"[" * 100_000, "nests too deeply"),
    ([1, 2], None, "must be a JSON object"),
    ({"messages": []}, None, "'messages' must be a non-empty array"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, None, "role 'robot'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
     None, "last message must be a user message"),
    ({"messages": [{"role": "user", "content": 5}]}, None, "content must be a string"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, None, "type 'audio'"),
    (_chat("hi", "data:image/png;base64,@@@"), None, "invalid base64"),
    (_chat("hi", "data:image/png;base64,aGVsbG8="), None, "cannot decode the image"),
    (_chat("hi", "http://example.com/cat.png"), None, "scheme 'http' is not served"),
    (_chat("hi", "../secret.png"), None, "outside the image root"),
    (_chat("hi", "/etc/passwd"), None, "outside the image root"),
    (_chat("hi", "missing.png"), None, "no such file"),
    (_chat("hi", max_tokens=100), None, "exceeds this server's limit 8"),
    (_chat("hi", max_tokens="5"), None, "'max_tokens' must be an integer"),
    (_chat("hi", temperature=-1), None, "temperature=-1.0 must be >= 0"),
    (_chat("hi", top_p=0), None, "top_p"),
    (_chat("hi", n=2), None, "'n' must be 1"),
    (_chat("hi", stream="yes"), None, "'stream' must be a boolean"),
    (_chat("hi", stream_options={"include_usage": True}), None, "only allowed with 'stream'"),
    (_chat("hi", stream=True, stream_options={"include_usage": 1}), None, "include_usage"),
    (_chat("hi", stop=[""]), None, "'stop' must be"),
    (_chat("hi <latent_image>"), None, "reserved_marker_in_text"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": _data_url()}},
        {"type": "image_url", "image_url": {"url": _data_url()}}]}]}, None, "second image"),
    (_chat("x" * 300_000), None, "exceeds the limit of 200000"),
    (_chat("hi " * 400), None, "the prompt takes .* positions"),
])
def test_bad_requests_get_400_and_the_server_keeps_serving(server, body, raw, match):
  import re
  status, err = _call(server["url"], "/v1/chat/completions", body, raw)
  assert status == 400, err
  assert err["error"]["type"] == "invalid_request_error"
  assert re.search(match, err["error"]["message"]), err
  assert _call(server["url"], "/health")[0] == 200


def test_unknown_route_is_404(server):
  status, err = _call(server["url"], "/v1/completions", {"prompt": "hi"})
  assert status == 404 and "no route" in err["error"]["message"]


def test_cli_serves_a_model_dir(server):
  """python -m fusion_jax.serve --workdir <model dir> --port 0: up, /health, /v1/models."""
  proc = subprocess.Popen(
      [sys.executable, "-m", "fusion_jax.serve", "--workdir", server["model_dir"], "--port", "0",
       "--max_batch", "2"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    warm = proc.stdout.readline()
    assert warm.startswith("warm-up: batch sizes 1..2 compiled in"), (
        warm, proc.stderr.read() if proc.poll() is not None else "")
    line = proc.stdout.readline()
    assert line.startswith("serving fusion_tiny (model_dir"), (line, proc.stderr.read()
                                                              if proc.poll() is not None else "")
    url = line.split(" at ")[1].split("/v1/")[0]
    assert _call(url, "/health")[1]["model"] == "fusion_tiny"
    assert _call(url, "/v1/models")[1]["data"][0]["id"] == "fusion_tiny"
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_warm_up_compiles_every_batch_bucket(server):
  from fusion_jax.serve.server import warm_up
  gen = server["srv"].batcher.generator
  seconds = warm_up(gen, server["srv"].limits, MAX_TOKENS)
  assert len(seconds) == 3 and all(t > 0 for t in seconds)  # batch buckets 1, 2, 4
  compiled = gen._prefill._cache_size(), gen._decode._cache_size()
  bodies = [_chat("What color is the ball?", _data_url(v)) for v in (10, 20, 30)]
  out = [None] * 3

  def worker(i):
    out[i] = _call(server["url"], "/v1/chat/completions", bodies[i])

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert all(st == 200 for st, _ in out)
  # Streams and stop strings decode in chunks (the host looks between them): no compile either.
  _stream(server["url"], {**bodies[0], "stream": True})
  assert _call(server["url"], "/v1/chat/completions", {**bodies[1], "stop": ["zz"]})[0] == 200
  assert (gen._prefill._cache_size(), gen._decode._cache_size()) == compiled  # no new compile
