"""lmms-eval model `fusion_jax`: a FUSION training workdir or model dir as an lmms-eval model.

  lmms-eval --model fusion_jax --model_args pretrained=MODEL_DIR[,step=N][,dtype=bfloat16] \
      --tasks mme,pope,mmbench_en_dev --batch_size 8 --output_path results/

lmms-eval (>= 0.6, lmms_eval/models/registry_v2.py) finds external models through the Python
entry-point group `lmms_eval.models`; pyproject.toml registers `manifest` below there, so
`pip install -e .` of this repository in lmms-eval's environment makes `--model fusion_jax`
available. lmms_eval is imported only when present: without it this module still imports
(the class then derives from a stand-in with lmms' attributes), so its request handling is
tested here without installing lmms-eval (which pins another torch than this project).

A simple (is_simple = True) lmms model; requests carry lmms-eval Instance.args:
  generate_until: (context, gen_kwargs, doc_to_visual, doc_id, task, split) -> greedy answer,
    ended by the first of gen_kwargs["until"] (stop strings); max_new_tokens honoured (default
    128); sampling settings ignored (FUSION is evaluated greedily).
  loglikelihood: (context, doc_to_target, doc_to_visual, doc_id, task, split) -> (log p of the
    continuation as the answer turn, whether greedy decoding produces it), one full forward
    (fusion_jax.eval.bench_model.loglikelihood).
The doc is `self.task_dict[task][split][doc_id]` (lmms-eval fills task_dict); its first visual
is the image (FUSION answers about one image; further visuals are dropped with a warning),
fetched only when its batch is built.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Any

from fusion_jax.eval import bench_model

MODEL_ID = "fusion_jax"
CLASS_PATH = "fusion_jax.eval.lmms_eval_model.FusionJax"
log = logging.getLogger(__name__)

try:  # lmms-eval present: a real lmms subclass, also in the legacy decorator registry
  from lmms_eval.api.model import lmms as _Base
  from lmms_eval.api.registry import register_model as _register
except ImportError:
  class _Base:  # noqa: D101 - lmms' attributes, for use and tests without lmms-eval
    is_simple = True

    def __init__(self) -> None:
      self._rank, self._world_size = 0, 1
      self.cache_hook = None
      self.task_dict: dict[str, Any] = {}

    @property
    def rank(self) -> int:
      return self._rank

    @property
    def world_size(self) -> int:
      return self._world_size

  def _register(*names: str):
    return lambda cls: cls


def manifest() -> Any:
  """Entry point `lmms_eval.models` payload: the ModelManifest naming FusionJax."""
  from lmms_eval.models.registry_v2 import ModelManifest
  return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def _flatten(visuals: Any) -> list[Any]:
  if visuals is None:
    return []
  if not isinstance(visuals, (list, tuple)):
    return [visuals]
  out = []
  for v in visuals:
    out += _flatten(v)
  return out


def _as_int(value: Any, default: int) -> int:
  try:
    return int(value)
  except (TypeError, ValueError):  # lmms-eval's batch_size may be 'auto'
    return default


def _opt_int(value: Any) -> int | None:
  """A model_arg that may be absent (None or '', as lmms-eval passes it) as an int."""
  return None if value in (None, "") else int(value)


def stop_strings(until: Any) -> tuple[str, ...]:
  """lmms-eval's gen_kwargs["until"] (a string or a list of them) as a tuple."""
  return tuple(s for s in ([until] if isinstance(until, str) else list(until or ())) if s)


@_register(MODEL_ID)
class FusionJax(_Base):
  """FUSION for lmms-eval (see the module docstring)."""
  is_simple = True

  def __init__(self, pretrained: str, step: int | None = None, dtype: str | None = None,
               batch_size: Any = 8, device: Any = None, seq_len: int | None = None,
               **kwargs: Any) -> None:
    """pretrained: training workdir or model dir; step: a run's checkpoint; dtype: compute
    dtype override; batch_size: prompts per device batch ('auto' -> 8); device: ignored (JAX
    places the model on its default device); seq_len: the longest prompt accepted (as the
    commands' --seq_len)."""
    super().__init__()
    del device
    if kwargs:
      log.warning("fusion_jax: model_args ignored: %s", sorted(kwargs))
    self.model = bench_model.load(str(pretrained), step=_opt_int(step), dtype=dtype or None,
                                  seq_len=_opt_int(seq_len))
    self.batch_size_per_gpu = max(1, _as_int(batch_size, 8))
    self._warned: set[str] = set()

  @property
  def batch_size(self) -> int:
    return self.batch_size_per_gpu

  def _warn_once(self, key: str, msg: str) -> None:
    if key not in self._warned:
      self._warned.add(key)
      log.warning(msg)

  def _doc_image(self, doc_to_visual: Any, doc_id: int, task: str, split: str) -> Any:
    """The first visual of the request's doc (PIL image or path), or None."""
    if doc_to_visual is None:
      return None
    visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
    if len(visuals) > 1:
      self._warn_once("multi", f"fusion_jax: {task} gives {len(visuals)} visuals per doc; "
                      "FUSION answers about the first one only")
    return visuals[0] if visuals else None

  def generate_until(self, requests: Sequence[Any]) -> list[str]:
    """Greedy answers to (context, gen_kwargs, doc_to_visual, doc_id, task, split) requests."""
    args = [r.args for r in requests]
    out = [""] * len(args)
    # (max_new_tokens, stop strings) -> requests: one generation pass each
    groups: dict[tuple[int, tuple[str, ...]], list[int]] = {}
    for i, (_, gen_kwargs, *_rest) in enumerate(args):
      gk = dict(gen_kwargs or {})
      if float(gk.get("temperature", 0) or 0) > 0 or gk.get("do_sample"):
        self._warn_once("sample", "fusion_jax: sampling settings ignored; answers are greedy")
      key = (_as_int(gk.get("max_new_tokens"), 128), stop_strings(gk.get("until")))
      groups.setdefault(key, []).append(i)
    for (max_new, stop), idx in groups.items():
      prompts = [(args[i][0], functools.partial(self._doc_image, *args[i][2:6])) for i in idx]
      answers = bench_model.generate(self.model, prompts, max_new_tokens=max_new, stop=stop,
                                     batch_size=self.batch_size)
      for i, a in zip(idx, answers):
        if isinstance(a, bench_model.Refused):
          log.warning("fusion_jax: %s request %s answered '': %s", args[i][4], args[i][3],
                      a.reason)
          a = ""
        out[i] = a
        if getattr(self.cache_hook, "add_partial", None):
          self.cache_hook.add_partial("generate_until", (args[i][0], args[i][1]), out[i])
    return out

  def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
    """(log p, is greedy) of (context, doc_to_target, doc_to_visual, doc_id, task, split)."""
    items = []
    for ctx, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
      cont = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
      items.append((ctx, str(cont),
                    functools.partial(self._doc_image, doc_to_visual, doc_id, task, split)))
    scored = bench_model.loglikelihood(self.model, items, batch_size=self.batch_size)
    out = []
    for (ctx, cont, _), s in zip(items, scored):
      if isinstance(s, bench_model.Refused):
        log.warning("fusion_jax: loglikelihood scored -inf: %s", s.reason)
        s = (float("-inf"), False)
      out.append(s)
      if getattr(self.cache_hook, "add_partial", None):
        self.cache_hook.add_partial("loglikelihood", (ctx, cont), s)
    return out

  def generate_until_multi_round(self, requests: Sequence[Any]) -> list[str]:
    raise NotImplementedError("fusion_jax: multi-round generation is not supported")
