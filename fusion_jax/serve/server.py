"""The OpenAI-compatible HTTP server (stdlib ThreadingHTTPServer).

  POST /v1/chat/completions   chat request (fusion_jax/serve/chat.py) -> chat.completion, or
                              with "stream": true server-sent events: chat.completion.chunk
                              objects (role, text deltas, finish_reason, usage if asked for)
                              and "data: [DONE]", sent as the tokens are decoded
  GET  /v1/models             the one served model
  GET  /health                {"status": "ok", ...}

Each connection has its own thread: it reads and validates the request (JSON, images decoded,
prompt encoded and checked against the limits), so a bad request is answered 400 without
reaching the model; good ones wait in the Batcher. Errors are JSON bodies
{"error": {"message", "type", "code"}}: 400 bad request (malformed, oversized, unsupported),
404 unknown path, 503 queue full, 504 timeout, 500 generation failure. No request can stop the
server: every handler error becomes a response. A stream that fails after its first event
ends with a `data: {"error": ...}` event instead of [DONE].
"""
from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from absl import logging
from PIL import Image

from fusion_jax.data.errors import BadSample
from fusion_jax.infer.generator import Completion, Generator
from fusion_jax.infer.sampling import SamplingParams
from fusion_jax.serve.batcher import Batcher, QueueFull
from fusion_jax.serve.chat import (ChatLimits, RequestError, chat_record, sampling_params,
                                   stream_settings)

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error",
               500: "server_error", 503: "server_busy", 504: "timeout"}


class FusionServer(ThreadingHTTPServer):
  """ThreadingHTTPServer holding the Batcher, the model name and the request limits."""
  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 256  # listen backlog (socketserver's 5 drops bursts: 1 s SYN retries)

  def __init__(self, address: tuple[str, int], batcher: Batcher, *, model_name: str,
               limits: ChatLimits, max_body_bytes: int = 32 * 2**20,
               request_timeout_s: float = 600.0):
    super().__init__(address, _Handler)
    self.batcher, self.model_name, self.limits = batcher, model_name, limits
    self.max_body_bytes, self.request_timeout_s = int(max_body_bytes), float(request_timeout_s)
    self.created = int(time.time())

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"

  def start(self) -> threading.Thread:
    """serve_forever in a daemon thread (tests, notebooks); returns the thread."""
    t = threading.Thread(target=self.serve_forever, name="fusion-http", daemon=True)
    t.start()
    return t


class _Handler(BaseHTTPRequestHandler):
  server: FusionServer
  protocol_version = "HTTP/1.1"
  # Streams write many small events: without TCP_NODELAY each waits for the client's delayed
  # ACK (~40 ms).
  disable_nagle_algorithm = True

  def log_message(self, fmt: str, *args: Any) -> None:  # absl instead of stderr lines
    logging.info("%s " + fmt, self.address_string(), *args)

  def _send(self, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    if status >= 400:
      self.send_header("Connection", "close")
      self.close_connection = True
    self.end_headers()
    self.wfile.write(data)

  def _error(self, status: int, message: str) -> None:
    self._send(status, {"error": {"message": message, "type": ERROR_TYPES.get(status, "error"),
                                  "param": None, "code": status}})

  def do_GET(self) -> None:  # noqa: N802 (http.server naming)
    try:
      path = self.path.split("?", 1)[0].rstrip("/")
      if path == "/health":
        st = self.server.batcher.stats
        self._send(200, {"status": "ok", "model": self.server.model_name,
                         "batches": st.batches, "requests": st.requests,
                         "largest_batch": st.largest})
      elif path == "/v1/models":
        self._send(200, {"object": "list", "data": [{
            "id": self.server.model_name, "object": "model", "created": self.server.created,
            "owned_by": "fusion_jax"}]})
      else:
        self._error(404, f"no route GET {path}; try /health, /v1/models, "
                         "POST /v1/chat/completions")
    except Exception as e:  # noqa: BLE001 - answer, never die
      logging.exception("GET %s failed", self.path)
      self._error(500, f"internal error: {e}")

  def do_POST(self) -> None:  # noqa: N802
    try:
      path = self.path.split("?", 1)[0].rstrip("/")
      if path != "/v1/chat/completions":
        self._error(404, f"no route POST {path}; use /v1/chat/completions")
        return
      self._chat(self._body())
    except RequestError as e:
      self._error(e.status, str(e))
    except QueueFull as e:
      self._error(503, str(e))
    except TimeoutError as e:
      self._error(504, str(e))
    except Exception as e:  # noqa: BLE001 - answer, never die
      logging.exception("POST %s failed", self.path)
      self._error(500, f"generation failed: {e}")

  def _body(self) -> Any:
    length = self.headers.get("Content-Length")
    if length is None or not length.strip().isdigit():
      raise RequestError("a Content-Length header is required")
    n = int(length)
    if n > self.server.max_body_bytes:
      self._drain(n)
      raise RequestError(f"request body of {n} bytes exceeds the limit of "
                         f"{self.server.max_body_bytes}")
    raw = self.rfile.read(n)
    try:
      return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise RequestError(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
      raise RequestError("the request body nests too deeply") from None

  def _drain(self, n: int) -> None:
    """Reads (and drops) a refused body so the client gets the 400 instead of a reset; a huge
    one is not read (the connection closes)."""
    if n <= 8 * self.server.max_body_bytes:
      while n > 0:
        chunk = self.rfile.read(min(n, 2**20))
        if not chunk:
          break
        n -= len(chunk)

  def _chat(self, req: Any) -> None:
    """Validates the request (RequestError before anything is sent), then answers it."""
    rid = "chatcmpl-" + uuid.uuid4().hex[:24]
    record = chat_record(req, self.server.limits, rid)
    sampling = sampling_params(req, self.server.limits)
    stream, include_usage = stream_settings(req)
    if sampling.seed is None and sampling.temperature > 0:
      sampling = dataclasses.replace(sampling, seed=uuid.uuid4().int % 2**32)
    try:
      self.server.batcher.generator.check(record, sampling)
    except (BadSample, ValueError) as e:
      raise RequestError(str(e)) from None
    model = req.get("model") or self.server.model_name
    timeout = self.server.request_timeout_s
    if stream:
      events = self.server.batcher.submit_stream(record, sampling, timeout_s=timeout)
      self._stream(rid, model, events, include_usage)
      return
    c = self.server.batcher.submit(record, sampling, timeout_s=timeout)
    self._send(200, {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text},
                     "logprobs": None, "finish_reason": c.finish_reason}],
        "usage": _usage(c)})

  def _stream(self, rid: str, model: str, events: Iterator[str | Completion],
              include_usage: bool) -> None:
    """Server-sent events over a chunked 200 response (module docstring)."""
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()
    created = int(time.time())

    def chunk(delta: dict[str, str] | None, finish: str | None = None, **extra: Any) -> None:
      choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None,
                                           "finish_reason": finish}]
      self._event(json.dumps({"id": rid, "object": "chat.completion.chunk", "created": created,
                              "model": model, "choices": choices, **extra},
                             ensure_ascii=False))

    try:
      chunk({"role": "assistant", "content": ""})
      done = None
      for ev in events:
        if isinstance(ev, Completion):
          done = ev
        else:
          chunk({"content": ev})
      assert done is not None
      chunk({}, done.finish_reason)
      if include_usage:
        chunk(None, usage=_usage(done))
      self._event("[DONE]")
    except (BrokenPipeError, ConnectionResetError):
      logging.info("stream %s: the client went away", rid)
      self.close_connection = True
      return
    except Exception as e:  # noqa: BLE001 - the status line is sent: report in the stream
      logging.exception("stream %s failed", rid)
      status = 504 if isinstance(e, TimeoutError) else 500
      self._event(json.dumps({"error": {"message": f"generation failed: {e}",
                                        "type": ERROR_TYPES[status], "param": None,
                                        "code": status}}))
      self.close_connection = True
    self.wfile.write(b"0\r\n\r\n")  # the chunked body's end
    self.wfile.flush()

  def _event(self, data: str) -> None:
    """One server-sent event as one HTTP chunk, flushed."""
    payload = f"data: {data}\n\n".encode()
    self.wfile.write(f"{len(payload):X}\r\n".encode() + payload + b"\r\n")
    self.wfile.flush()


def warm_up(generator: Generator, limits: ChatLimits, max_tokens: int,
            record: Mapping[str, Any] | None = None) -> list[float]:
  """Compiles a request at every batch-size bucket (1, 2, 4, ... max_batch), so the first
  requests find them compiled; a prompt or answer of another length bucket still compiles on
  first use. record: the prompt (default: a typical one, an image and a short question);
  `max_tokens` new tokens. Returns the seconds per bucket."""
  if record is None:
    buf = io.BytesIO()
    Image.new("RGB", (limits.image_size,) * 2, (128, 128, 128)).save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    record = chat_record({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe the image."},
        {"type": "image_url", "image_url": {"url": url}}]}]}, limits, "warm-up")
  sampling = SamplingParams(max_new_tokens=max_tokens)
  seconds, b = [], 1
  while True:
    t = time.perf_counter()
    generator.generate([record] * b, sampling)
    seconds.append(time.perf_counter() - t)
    if b >= generator.max_batch:
      return seconds
    b = min(2 * b, generator.max_batch)


def _usage(c: Completion) -> dict[str, int]:
  return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
          "total_tokens": c.prompt_tokens + c.completion_tokens}
