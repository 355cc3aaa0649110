"""Server throughput: N chat requests one at a time vs all at once (batched by the server), and
streamed one at a time (time to the first text delta).

  python benchmarks/serve_throughput.py [--workdir DIR] [--requests 16] [--max_batch 8]
      [--max_tokens 16] [--dtype bfloat16]

Without --workdir a tiny random FUSION model (the tests' preset) is built in a temp dir. The
server runs in this process on 127.0.0.1; every shape bucket used is compiled by a warm-up pass
first, so the numbers are steady-state. Prints requests/s and generated tokens/s of each mode,
and the median time to the first content delta of the streamed requests.
"""
from __future__ import annotations

import base64
import io
import json
import os
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from fusion_jax import cli  # noqa: E402

PROG = "python benchmarks/serve_throughput.py"


def define_flags(fv: flags.FlagValues) -> None:
  flags.DEFINE_string("workdir", "", "model workdir (default: a tiny random model in a temp dir)",
                      flag_values=fv)
  flags.DEFINE_integer("requests", 16, "chat requests per mode", flag_values=fv)
  flags.DEFINE_integer("max_batch", 8, "the generator's largest batch", flag_values=fv)
  flags.DEFINE_integer("max_tokens", 16, "tokens generated per request", flag_values=fv)
  flags.DEFINE_string("dtype", None, "compute dtype (default: the model's)", flag_values=fv)


def _tiny_model_dir(root: str) -> str:
  from tests.model_fixtures import make_model_dir
  return make_model_dir(root)[0]


def _png(value: int) -> str:
  from PIL import Image
  buf = io.BytesIO()
  Image.new("RGB", (64, 48), (value % 256, 30, 200)).save(buf, "PNG")
  return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _post(url: str, body: dict) -> dict:
  req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=600) as r:
    return json.loads(r.read())


def _post_stream(url: str, body: dict) -> tuple[float, dict]:
  """(seconds to the first content delta, the usage chunk) of one streamed request."""
  req = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(
      {**body, "stream": True, "stream_options": {"include_usage": True}}).encode(),
      headers={"Content-Type": "application/json"})
  t0, first, usage = time.perf_counter(), None, {}
  with urllib.request.urlopen(req, timeout=600) as r:
    for line in r:
      line = line.decode().strip()
      if not line.startswith("data: {"):
        continue
      chunk = json.loads(line[len("data: "):])
      if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
        first = time.perf_counter() - t0
      usage = chunk.get("usage") or usage
  return (time.perf_counter() - t0 if first is None else first), {"usage": usage}


def main(a) -> int:
  import jax

  from fusion_jax.infer.generator import Generator
  from fusion_jax.infer.load import load_model
  from fusion_jax.serve.batcher import Batcher
  from fusion_jax.serve.chat import ChatLimits
  from fusion_jax.serve.server import FusionServer, warm_up

  workdir = a.workdir or _tiny_model_dir(tempfile.mkdtemp())
  model = load_model(workdir, dtype=a.dtype)
  gen = Generator.for_model(model, max_batch=a.max_batch, max_new_tokens=a.max_tokens)
  srv = FusionServer(("127.0.0.1", 0), Batcher(gen, window_s=0.01), model_name=model.name,
                     limits=ChatLimits(image_size=model.cfg.vision.image_size))
  srv.start()
  bodies = [{"messages": [{"role": "user", "content": [
      {"type": "text", "text": f"What color is the ball {i}?"},
      {"type": "image_url", "image_url": {"url": _png(i * 37)}}]}],
      "max_tokens": a.max_tokens, "temperature": 0} for i in range(a.requests)]

  def concurrent() -> list[dict]:
    out: list[dict] = [{}] * len(bodies)

    def work(i: int) -> None:
      out[i] = _post(srv.url, bodies[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(bodies))]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    return out

  def sequential() -> list[dict]:
    return [_post(srv.url, b) for b in bodies]

  first_delta: list[float] = []

  def streamed() -> list[dict]:
    out = []
    for b in bodies:
      t, res = _post_stream(srv.url, b)
      first_delta.append(t)
      out.append(res)
    return out

  # Compile every batch-size bucket (the server pads a batch of k requests to a power of two)
  # with this benchmark's own prompt, so its length bucket is the one timed.
  from fusion_jax.serve.chat import chat_record
  warm_up(gen, srv.limits, a.max_tokens, chat_record(bodies[0], srv.limits))
  print(f"model {model.name} ({model.cfg.llm.dtype}), {a.requests} requests, max_tokens "
        f"{a.max_tokens}, max_batch {a.max_batch}, device {jax.devices()[0].platform}")
  for name, fn in (("sequential", sequential), ("concurrent", concurrent),
                   ("streamed", streamed)):
    before = srv.batcher.stats.batches
    t0 = time.perf_counter()
    res = fn()
    dt = time.perf_counter() - t0
    toks = sum(r["usage"]["completion_tokens"] for r in res)
    print(f"{name:>10}: {dt:7.2f} s  {len(res) / dt:7.2f} req/s  {toks / dt:8.1f} tok/s  "
          f"({srv.batcher.stats.batches - before} device batches)"
          + (f", first delta after {sorted(first_delta)[len(first_delta) // 2] * 1e3:.0f} ms "
             "(median)" if name == "streamed" else ""))
  srv.shutdown()
  return 0


if __name__ == "__main__":
  cli.app_main(define_flags, main, PROG)
