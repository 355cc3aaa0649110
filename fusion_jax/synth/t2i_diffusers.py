"""Render stage backed by a diffusers text-to-image pipeline (FLUX, SDXL, SD-turbo, ...).

  renderer = DiffusersRenderer("/models/FLUX.1-dev", dtype="bfloat16", steps=28, guidance=3.5,
                               resolution=1024, batch_size=4)
  image = renderer.render(description, size=384, rng=rng)   # (384, 384, 3) uint8

`pipeline` is any local directory `DiffusionPipeline.from_pretrained` loads (the model_index.json
folder); nothing is downloaded. diffusers and torch are imported on first use only and are
optional (requirements-synth.txt). The pipeline draws at `resolution` (default: `size` rounded
up to a multiple of 16) and the result is resized to `size`.

Reproducibility: each item's initial noise comes from its own torch.Generator seeded from the
item's rng, so an item's image does not depend on which other items share its batch, up to the
floating-point differences batched kernels may bring (set batch_size=1 for bit-exact reruns on
the same hardware and software).

Batching: `render` is called from many engine threads at once; calls are gathered into batches
of up to `batch_size` prompts (waiting at most `max_wait_s` for a batch to fill) and run one
pipeline call at a time.

Contrast categories (two similar pictures side by side): when the description carries
`focus["panel_prompts"]` (the LLM describer writes them), both panels are drawn from the same
seed, so they share a composition and differ where the prompts differ, and are placed side by
side (letterboxed, undistorted) with a divider, like the procedural contrast images.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import threading
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from fusion_jax.synth import scene as S
from fusion_jax.synth.backends import item_seed

DTYPES = ("bfloat16", "float16", "float32")
GAP_GREY = 128  # letterbox and divider grey of contrast images


class _Job:
  def __init__(self, item: Any):
    self.item = item
    self.done = threading.Event()
    self.out: Any = None
    self.err: BaseException | None = None


class MicroBatcher:
  """Gathers concurrent `submit(item)` calls into `fn(items) -> outputs` calls.

  The first caller of a batch waits up to max_wait_s for the batch to fill, then runs it; one
  `fn` call runs at a time. An exception in `fn` is raised in every caller of that batch.
  """

  def __init__(self, fn: Callable[[list[Any]], Sequence[Any]], batch_size: int,
               max_wait_s: float):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.fn, self.batch_size, self.max_wait_s = fn, batch_size, max_wait_s
    self._cond = threading.Condition()
    self._pending: list[_Job] = []
    self._run_lock = threading.Lock()
    self.calls = 0

  def submit(self, item: Any) -> Any:
    job = _Job(item)
    with self._cond:
      self._pending.append(job)
      self._cond.notify_all()
      deadline = time.monotonic() + self.max_wait_s
      while job in self._pending and len(self._pending) < self.batch_size:
        left = deadline - time.monotonic()
        if left <= 0:
          break
        self._cond.wait(left)
    while not job.done.is_set():
      with self._cond:
        mine = job in self._pending
      if not mine:  # another thread is running the batch holding this job
        job.done.wait()
        break
      with self._run_lock:
        with self._cond:
          batch = self._pending[:self.batch_size]
          del self._pending[:len(batch)]
        if batch:
          self._run(batch)
    if job.err is not None:
      raise job.err
    return job.out

  def _run(self, batch: list[_Job]) -> None:
    self.calls += 1
    try:
      outs = list(self.fn([j.item for j in batch]))
      if len(outs) != len(batch):
        raise RuntimeError(f"batch function returned {len(outs)} outputs for {len(batch)} inputs")
      for j, o in zip(batch, outs):
        j.out = o
    except BaseException as e:  # noqa: BLE001 - handed to every waiting caller
      for j in batch:
        j.err = e
    finally:
      for j in batch:
        j.done.set()


def diffusers_available() -> bool:
  return importlib.util.find_spec("diffusers") is not None and \
      importlib.util.find_spec("torch") is not None


def side_by_side(left: np.ndarray, right: np.ndarray, size: int) -> np.ndarray:
  """Two square panels letterboxed into one (size, size, 3) image with a divider strip."""
  gap = max(2, size // 50)
  side = (size - gap) // 2
  out = np.full((size, size, 3), GAP_GREY, np.uint8)
  top = (size - side) // 2
  for x0, im in ((0, left), (size - side, right)):
    panel = Image.fromarray(im).resize((side, side), Image.BICUBIC)
    out[top:top + side, x0:x0 + side] = np.asarray(panel)
  return out


class DiffusersRenderer:
  """Renderer over a local diffusers pipeline (module docstring).

  pipeline: local pipeline directory. dtype: bfloat16 | float16 | float32.
  device: "cuda", "cpu", ... (default: cuda when available). cpu_offload: enable model CPU
    offload (large pipelines on small GPUs; needs accelerate).
  steps, guidance: num_inference_steps and guidance_scale (FLUX.1-dev: 28-50 and 3.5;
    SD-turbo: 1-4 and 0.0). resolution: the side the pipeline draws at (square).
  prompt: format string with {caption} (e.g. "{caption}, photograph, high detail").
  negative_prompt: passed when set (pipelines without classifier-free guidance ignore it or
    reject it). extra: more keyword arguments for the pipeline call (e.g. max_sequence_length).
  """

  def __init__(self, pipeline: str, dtype: str = "bfloat16", device: str | None = None,
               steps: int = 28, guidance: float = 3.5, resolution: int | None = None,
               batch_size: int = 1, max_wait_s: float = 0.05, prompt: str = "{caption}",
               negative_prompt: str | None = None, cpu_offload: bool = False,
               extra: Mapping[str, Any] | None = None):
    if not diffusers_available():
      raise ImportError("the diffusers renderer needs diffusers and torch: "
                        "pip install -r requirements-synth.txt")
    if not os.path.isfile(os.path.join(pipeline, "model_index.json")):
      raise FileNotFoundError(f"diffusers pipeline {pipeline!r}: no model_index.json there; "
                              "pass the local directory of a saved pipeline (e.g. a snapshot "
                              "of black-forest-labs/FLUX.1-dev)")
    if dtype not in DTYPES:
      raise ValueError(f"DiffusersRenderer: dtype must be one of {DTYPES}, got {dtype!r}")
    if resolution is not None and resolution % 8:
      raise ValueError(f"DiffusersRenderer: resolution must be a multiple of 8 (16 for FLUX), "
                       f"got {resolution}")
    self.path, self.dtype, self.device, self.cpu_offload = pipeline, dtype, device, cpu_offload
    self.steps, self.guidance, self.resolution = steps, guidance, resolution
    self.prompt, self.negative_prompt = prompt, negative_prompt
    self.extra = dict(extra or {})
    self._pipe: Any = None
    self._load_lock = threading.Lock()
    self.batcher = MicroBatcher(self._generate, batch_size, max_wait_s)

  def _load(self) -> Any:
    with self._load_lock:
      if self._pipe is None:
        import torch
        from diffusers import DiffusionPipeline
        torch_dtype = getattr(torch, self.dtype)
        # diffusers >= 0.36 names the argument dtype (torch_dtype is deprecated there).
        major_minor = tuple(int(x) for x in
                            importlib.metadata.version("diffusers").split(".")[:2])
        key = "dtype" if major_minor >= (0, 36) else "torch_dtype"
        pipe = DiffusionPipeline.from_pretrained(self.path, **{key: torch_dtype})
        pipe.set_progress_bar_config(disable=True)
        if self.cpu_offload:
          pipe.enable_model_cpu_offload()
        else:
          device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
          pipe.to(device)
        self._pipe = pipe
    return self._pipe

  def _generate(self, items: list[tuple[str, int, int]]) -> list[np.ndarray]:
    """[(prompt, seed, resolution)] -> [(resolution, resolution, 3) uint8], in order."""
    import torch
    pipe = self._load()
    result: list[Any] = [None] * len(items)
    # Items of different resolutions cannot share a call (rare: one engine run has one size).
    for res in dict.fromkeys(r for _, _, r in items):
      idx = [k for k, (_, _, r) in enumerate(items) if r == res]
      gen_device = "cpu" if self.cpu_offload else pipe.device
      kwargs: dict[str, Any] = dict(
          prompt=[items[k][0] for k in idx], num_inference_steps=self.steps,
          guidance_scale=self.guidance, height=res, width=res, output_type="np",
          generator=[torch.Generator(gen_device).manual_seed(items[k][1]) for k in idx])
      if self.negative_prompt is not None:
        kwargs["negative_prompt"] = [self.negative_prompt] * len(idx)
      kwargs.update(self.extra)
      with torch.inference_mode():
        images = pipe(**kwargs).images
      for k, im in zip(idx, images):
        result[k] = np.clip(np.round(np.asarray(im, np.float32) * 255.0), 0, 255).astype(np.uint8)
    return result

  def _draw(self, text: str, seed: int, size: int) -> np.ndarray:
    res = self.resolution or max(64, -(-size // 16) * 16)
    im = self.batcher.submit((self.prompt.format(caption=text), seed, res))
    if im.shape[:2] != (size, size):
      im = np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC))
    return im

  def render(self, desc: S.Description, size: int, rng: np.random.Generator) -> np.ndarray:
    seed = item_seed(rng)
    panels = desc.focus.get("panel_prompts") if isinstance(desc.focus, Mapping) else None
    if panels:
      left, right = (self._draw(p, seed, size) for p in panels)
      return side_by_side(left, right, size)
    return self._draw(desc.caption, seed, size)
