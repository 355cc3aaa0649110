"""OpenAI chat-completions requests -> FUSION prompt records and sampling settings.

Accepted request fields (anything else is ignored, as OpenAI-compatible servers do):
  messages     [{role: system | user | assistant, content: str | [part, ...]}], alternating
               user / assistant turns ending with a user turn, an optional leading system
               message (replaces the template's system text)
  part         {"type": "text", "text": str} or {"type": "image_url", "image_url": {"url": U}}
               (or "image_url": U); at most one image per conversation (FUSION has one
               image slot)
  U            data:image/<fmt>;base64,<data>, or with an image root configured a file path /
               file:// URL inside it; nothing is fetched from the network
  max_tokens / max_completion_tokens, temperature, top_p, top_k (extension), stop (str or up
  to 4 strings), seed, n (1 only), stream (server-sent events of chat.completion.chunk
  objects, then "data: [DONE]"), stream_options.include_usage (a last chunk with the usage),
  model (echoed; any name is accepted)

Every problem raises RequestError (HTTP 400) with a message naming the field.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import urllib.parse
from collections.abc import Mapping
from typing import Any

import numpy as np

from fusion_jax.data.errors import BadSample
from fusion_jax.data.images import load_static_hd
from fusion_jax.data.tokenizer import IMAGE_MARKER
from fusion_jax.infer.sampling import SamplingParams

MAX_STOP_STRINGS = 4


class RequestError(ValueError):
  """A request the server refuses (HTTP 400; `status` may say otherwise)."""

  def __init__(self, message: str, status: int = 400):
    super().__init__(message)
    self.status = status


@dataclasses.dataclass(frozen=True)
class ChatLimits:
  """image_root: directory local image files must be inside ('' = local files refused);
  max_image_bytes: encoded image size limit; default_max_tokens: when the request names none."""
  image_size: int
  image_root: str = ""
  max_image_bytes: int = 20 * 2**20
  default_max_tokens: int = 256


def _number(req: Mapping[str, Any], key: str, kind: type, default: Any) -> Any:
  v = req.get(key)
  if v is None:
    return default
  if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and
                                                                 not float(v).is_integer()):
    raise RequestError(f"'{key}' must be {'an integer' if kind is int else 'a number'}, got "
                       f"{json_type(v)}")
  return kind(v)


def json_type(v: Any) -> str:
  return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
          type(None): "null"}.get(type(v), type(v).__name__)


def sampling_params(req: Mapping[str, Any], limits: ChatLimits) -> SamplingParams:
  """The request's SamplingParams (RequestError on a bad field)."""
  if req.get("n", 1) != 1:
    raise RequestError("'n' must be 1 (one choice per request)")
  max_tokens = _number(req, "max_completion_tokens", int, None)
  max_tokens = _number(req, "max_tokens", int, max_tokens)
  stop = req.get("stop")
  if stop is None:
    stop = []
  elif isinstance(stop, str):
    stop = [stop]
  if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
    raise RequestError("'stop' must be a non-empty string or an array of them")
  if len(stop) > MAX_STOP_STRINGS:
    raise RequestError(f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS}")
  seed = _number(req, "seed", int, None)
  try:
    return SamplingParams(
        max_new_tokens=limits.default_max_tokens if max_tokens is None else max_tokens,
        temperature=_number(req, "temperature", float, 0.0),
        top_p=_number(req, "top_p", float, 1.0), top_k=_number(req, "top_k", int, 0),
        stop=tuple(stop), seed=None if seed is None else seed % 2**32)
  except ValueError as e:
    raise RequestError(f"bad sampling setting: {e}") from None


def stream_settings(req: Mapping[str, Any]) -> tuple[bool, bool]:
  """(stream, include_usage) of a request (RequestError on a bad field)."""
  stream = req.get("stream", False)
  if not isinstance(stream, bool) and stream is not None:
    raise RequestError(f"'stream' must be a boolean, got {json_type(stream)}")
  opts = req.get("stream_options")
  if opts is None:
    return bool(stream), False
  if not isinstance(opts, dict):
    raise RequestError(f"'stream_options' must be an object, got {json_type(opts)}")
  if not stream:
    raise RequestError("'stream_options' is only allowed with 'stream': true")
  usage = opts.get("include_usage", False)
  if not isinstance(usage, bool):
    raise RequestError(f"'stream_options.include_usage' must be a boolean, got "
                       f"{json_type(usage)}")
  return True, usage


def load_request_image(url: str, limits: ChatLimits) -> np.ndarray:
  """static_hd crops (5, H, W, 3) uint8 of an image_url (see the module docstring)."""
  if not isinstance(url, str) or not url:
    raise RequestError("image_url.url must be a non-empty string")
  if url.startswith("data:"):
    head, sep, data = url.partition(",")
    if not sep or not head.endswith(";base64"):
      raise RequestError("image data URLs must be data:image/<format>;base64,<data>")
    if len(data) > limits.max_image_bytes * 4 // 3 + 4:
      raise RequestError(f"image larger than {limits.max_image_bytes} bytes")
    try:
      raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
      raise RequestError("image data URL: invalid base64") from None
    source = "image_url (data URL)"
  else:
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme == "file":
      path = urllib.parse.unquote(urllib.parse.urlsplit(url).path)
    elif scheme and len(scheme) > 1:  # a Windows drive letter is not a scheme
      raise RequestError(f"image_url scheme {scheme!r} is not served: send the image inline as "
                         "a data: URL (this server fetches nothing from the network)")
    else:
      path = url
    if not limits.image_root:
      raise RequestError("local image paths are refused (the server has no --image_root); send "
                         "the image inline as a data: URL")
    root = os.path.realpath(limits.image_root)
    real = os.path.realpath(path if os.path.isabs(path) else os.path.join(root, path))
    if os.path.commonpath([root, real]) != root:
      raise RequestError(f"image path {path!r} is outside the image root")
    if not os.path.isfile(real):
      raise RequestError(f"image path {path!r}: no such file under the image root")
    if os.path.getsize(real) > limits.max_image_bytes:
      raise RequestError(f"image larger than {limits.max_image_bytes} bytes")
    raw = real
    source = f"image_url {path!r}"
  try:
    return load_static_hd(raw, limits.image_size, source=source)
  except BadSample as e:
    raise RequestError(f"{source}: cannot decode the image ({e.reason}: {e.message})") from None


def _content(content: Any, k: int, limits: ChatLimits) -> tuple[str, np.ndarray | None]:
  """(text, decoded image or None) of one message's content."""
  if isinstance(content, str):
    return content, None
  if not isinstance(content, list):
    raise RequestError(f"messages[{k}].content must be a string or an array of parts, got "
                       f"{json_type(content)}")
  texts, image = [], None
  for j, part in enumerate(content):
    where = f"messages[{k}].content[{j}]"
    if not isinstance(part, Mapping):
      raise RequestError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
      if not isinstance(part.get("text"), str):
        raise RequestError(f"{where}.text must be a string")
      texts.append(part["text"])
    elif kind == "image_url":
      if image is not None:
        raise RequestError(f"{where}: a second image; FUSION takes one image per conversation")
      ref = part.get("image_url")
      url = ref.get("url") if isinstance(ref, Mapping) else ref
      image = load_request_image(url, limits)
    else:
      raise RequestError(f"{where}.type {kind!r}: expected 'text' or 'image_url'")
  return "\n".join(texts), image


def chat_record(req: Any, limits: ChatLimits, request_id: str = "request") -> dict[str, Any]:
  """A prompt record for fusion_jax.infer.generator from a chat request (RequestError if bad)."""
  if not isinstance(req, Mapping):
    raise RequestError(f"the request body must be a JSON object, got {json_type(req)}")
  messages = req.get("messages")
  if not isinstance(messages, list) or not messages:
    raise RequestError("'messages' must be a non-empty array")
  system = None
  turns: list[dict[str, str]] = []
  images = None
  for k, msg in enumerate(messages):
    if not isinstance(msg, Mapping):
      raise RequestError(f"messages[{k}] must be an object")
    role = msg.get("role")
    text, image = _content(msg.get("content"), k, limits)
    if image is not None:
      if role != "user":
        raise RequestError(f"messages[{k}]: images go in user messages")
      if images is not None:
        raise RequestError(f"messages[{k}]: a second image; FUSION takes one image per "
                           "conversation")
      images = image
      text = IMAGE_MARKER + "\n" + text
    if role == "system":
      if k != 0:
        raise RequestError(f"messages[{k}]: a system message must come first")
      system = text
    elif role in ("user", "assistant"):
      turns.append({"from": "human" if role == "user" else "gpt", "value": text})
    else:
      raise RequestError(f"messages[{k}].role {role!r}: expected system, user or assistant")
  if not turns or turns[-1]["from"] != "human":
    raise RequestError("the last message must be a user message")
  rec: dict[str, Any] = {"id": request_id, "conversations": turns}
  if system is not None:
    rec["system"] = system
  if images is not None:
    rec["images"] = images
  return rec
