"""A scripted OpenAI-compatible chat server on 127.0.0.1 for the synthesis backend tests.

`FakeChatServer()` answers POST /v1/chat/completions. Queued faults (`server.faults`) are served
first, one per request: ("status", code[, retry_after]), ("delay", seconds) (then the normal
reply, late), ("text", reply_text) (a 200 with that assistant text), ("raw", bytes) (a 200 whose
body is not JSON). Otherwise `model_reply` plays the models:

  describe prompt -> {"description": "A large <colour> circle ..."} (the seed caption's colour)
  ask prompt      -> one colour question; the answer is the described colour, except that a
                     request whose seed is divisible by LIE_EVERY answers the wrong colour
  image prompt    -> the VLM: reads the colour at the image centre (nearest palette colour) and
                     answers / verifies honestly

`generate_image` is the matching text-to-image stand-in (TextToImageRenderer): the first palette
colour named in the prompt fills a centred disc on grey.
"""
from __future__ import annotations

import base64
import http.server
import io
import json
import re
import threading
import time
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fusion_jax.synth import scene as S
from fusion_jax.synth.openai_client import METER

LIE_EVERY = 4
_COLOURS = "|".join(S.COLORS)


def first_colour(text: str) -> str:
  m = re.search(rf"\b({_COLOURS})\b", text)
  return m.group(1) if m else "red"


def generate_image(prompt: str, size: int, seed: int) -> np.ndarray:
  img = np.full((size, size, 3), 128, np.uint8)
  yy, xx = np.mgrid[:size, :size]
  disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2
  img[disc] = S.PALETTE[first_colour(prompt)]
  img[0, 0] = seed % 256  # items differ even with equal colours
  return img


def centre_colour(data_url: str) -> str:
  im = np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))
  px = im[im.shape[0] // 2, im.shape[1] // 2].astype(int)
  return min(S.COLORS, key=lambda c: sum((px - np.array(S.PALETTE[c])) ** 2))


def model_reply(payload: dict[str, Any]) -> str:
  content = payload["messages"][-1]["content"]
  seed = int(payload.get("seed", 0))
  if isinstance(content, list):  # the VLM: an image and a question
    seen = centre_colour(next(p for p in content if p["type"] == "image_url")["image_url"]["url"])
    text = next(p for p in content if p["type"] == "text")["text"]
    if "Candidates:" in text:
      return json.dumps({"answer": seen})
    proposed = text.split("Proposed answer:", 1)[1].split("\n", 1)[0].strip()
    return json.dumps({"verdict": "yes" if proposed == seen else "no"})
  if "Caption:" in content:
    caption = content.split("Caption:", 1)[1].split("\n", 1)[0].strip()
    return json.dumps({"description": f"A large {first_colour(caption)} circle in the centre of "
                                      f"a plain grey background. Seed: {caption}"})
  colour = first_colour(content.split("Description:", 1)[1])
  if seed % LIE_EVERY == 0:
    colour = next(c for c in S.COLORS if c != colour)
  return json.dumps({"qa": [{"question": "What colour is the circle?", "answer": colour,
                             "candidates": list(S.COLORS), "answer_type": "color"}]})


class FakeChatServer:
  """Threaded HTTP server; `requests` holds every payload received (see module docstring)."""

  def __init__(self) -> None:
    self.faults: list[tuple] = []
    self.requests: list[dict[str, Any]] = []
    self.lock = threading.Lock()
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def log_message(self, *args: Any) -> None:
        pass

      def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        payload = json.loads(body)
        with server.lock:
          server.requests.append(payload)
          fault = server.faults.pop(0) if server.faults else None
        text = None
        if fault is not None:
          kind = fault[0]
          if kind == "status":
            self.send_response(fault[1])
            if len(fault) > 2:
              self.send_header("Retry-After", str(fault[2]))
            self.end_headers()
            self.wfile.write(b'{"error": "scripted"}')
            return
          if kind == "raw":
            self._send(fault[1])
            return
          if kind == "delay":
            time.sleep(fault[1])
          if kind == "text":
            text = fault[1]
        if text is None:
          text = model_reply(payload)
        self._send(json.dumps({"choices": [{"message": {"role": "assistant",
                                                        "content": text}}]}).encode())

      def _send(self, data: bytes) -> None:
        try:
          self.send_response(200)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # the client timed out and left

    self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self.httpd.daemon_threads = True
    self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def count(self, kind: str) -> int:
    """Requests received of kind "describe", "ask" or "vlm"."""
    def kind_of(p: dict[str, Any]) -> str:
      c = p["messages"][-1]["content"]
      return "vlm" if isinstance(c, list) else ("describe" if "Caption:" in c else "ask")
    with self.lock:
      return sum(kind_of(p) == kind for p in self.requests)

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server():
  """A FakeChatServer with the request meter reset before and after the test."""
  s = FakeChatServer()
  METER.reset()
  yield s
  s.close()
  METER.reset()
