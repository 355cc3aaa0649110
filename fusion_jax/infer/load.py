"""Load "a model" for inference: a training workdir or a model dir, through one call.

  from fusion_jax.infer.load import load_model
  m = load_model(path, step=None, dtype=None)
  m.params, m.cfg, m.tokenizer, m.cfg.template, m.seq_len, m.max_questions, m.q, m.step

`path` is either
  * a training workdir (python -m fusion_jax.train --workdir; a local or gs:// path): its
    newest complete checkpoint, or `step`; the FusionConfig, tokenizer and prompt layout
    (data.seq_len, data.max_questions, data.eval_q, data.image_root) come from the
    experiment config saved with that step;
  * a model dir (fusion_jax.convert.model_dir, written by import_torch / import_hf /
    save_model_dir): fusion_config.json, params/, tokenizer/ (and meta.json). Its prompt layout
    defaults are `model_dir_layout` below.

`dtype` ('float32' | 'bfloat16') replaces the COMPUTE dtype of the LLM and the tower (and so
of the KV cache) that the model states (the run's compute_dtype, or fusion_config.json's
llm.dtype / vision.dtype, which import_torch / import_hf log); the stored parameters are not
cast. Every command that takes --workdir (infer, eval, serve, convert.export_torch, and
eval.bench) loads through here.

Params reach the model through `params_for_config` alone: the one place that adapts a stored
parameter layout (e.g. unscanned layers_i vs a scanned `layers` stack) to the FusionConfig.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

from absl import flags
import jax

from fusion_jax.models import fusion, param_layout, query_len

COMPUTE_DTYPES = ("float32", "bfloat16")
# Model-dir prompt layout defaults (a training run states its own in config.data).
MODEL_DIR_MAX_QUESTIONS = 8
MODEL_DIR_MAX_SEQ_LEN = 4096  # the authors' tokenizer_model_max_length in the final stages


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """A model ready for generation / scoring.

  Attributes:
    cfg: the FusionConfig (compute dtype already overridden when `dtype` was given).
    params: plain nested dict of jax arrays on the default device, in cfg's layout.
    kind: 'workdir' (a training run) or 'model_dir'.
    path: the directory it was loaded from (absolute).
    step: the checkpoint step of a run; None for a model dir.
    seq_len: the longest prompt layout (image and latent slots included) this model is asked
      with: the run's data.seq_len, or `model_dir_layout`'s for a model dir.
    max_questions: user turns per prompt that get latent slots (data.max_questions).
    q: latent tokens per question at inference (data.eval_q, default the largest of
      cfg.query_len: models/query_len.eval_q).
    image_root: where relative image paths of the run's records resolve ('' for a model dir).
    tokenizer_path: tokenizer file or directory ('' when the model has none).
    config: the run's experiment config (ml_collections.ConfigDict); None for a model dir.
    meta: a model dir's meta.json ({} for a run).
  """
  cfg: fusion.FusionConfig
  params: Any
  kind: str
  path: str
  step: int | None
  seq_len: int
  max_questions: int
  q: int
  image_root: str = ""
  tokenizer_path: str = ""
  config: Any = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def name(self) -> str:
    """Short model id: the directory name, with @step for a run."""
    base = os.path.basename(os.path.normpath(self.path))
    return f"{base}@{self.step}" if self.step is not None else base

  @functools.cached_property
  def tokenizer(self):
    """The model's fusion_jax Tokenizer (pad token of its template); loaded on first use."""
    from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS, load_tokenizer
    if not self.tokenizer_path:
      raise FileNotFoundError(
          f"{self.path}: no tokenizer (a model dir keeps it in tokenizer/; copy the LLM's "
          "tokenizer.json or tokenizer.model there)")
    return load_tokenizer(self.tokenizer_path, pad_token=TEMPLATE_PAD_TOKENS[self.cfg.template])


def define_loader_flags(fv: flags.FlagValues | None = None) -> None:
  """--workdir, --step, --dtype: the flags of every command that loads a model through
  `load_model` (infer, serve, eval, eval.bench), declared once; fv defaults to absl's FLAGS."""
  fv = flags.FLAGS if fv is None else fv
  flags.DEFINE_string("workdir", None, "training workdir or model dir (import_torch / "
                      "import_hf)", flag_values=fv)
  flags.DEFINE_integer("step", None, "checkpoint step of a training workdir (default: the "
                       "newest)", flag_values=fv)
  flags.DEFINE_enum("dtype", None, list(COMPUTE_DTYPES), "compute dtype (default: the model's)",
                    flag_values=fv)
  flags.DEFINE_integer("seq_len", None, "longest prompt, image and latent slots included "
                       "(default: the run's data.seq_len, or 4096 for a model dir; at most the "
                       "LLM's max_position_embeddings)", flag_values=fv)


def with_compute_dtype(cfg: fusion.FusionConfig, dtype: str | None) -> fusion.FusionConfig:
  """cfg with the LLM's and the tower's compute dtype set to `dtype` (None: unchanged)."""
  if dtype is None:
    return cfg
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"--dtype {dtype!r}: choose one of {COMPUTE_DTYPES}")
  return cfg.replace(llm=cfg.llm.replace(dtype=dtype),
                     vision=dataclasses.replace(cfg.vision, dtype=dtype))


def params_for_config(params: Any, cfg: fusion.FusionConfig) -> Any:
  """Stored params -> the layout `cfg` expects (the only params -> model step of loading):
  unrolled or scanned layers, either way (fusion_jax.models.param_layout)."""
  if not isinstance(params, Mapping) or not isinstance(params.get("llm"), Mapping):
    raise ValueError("params have no 'llm' subtree; not FUSION parameters")
  return param_layout.to_config_layout(params, cfg)


def model_dir_layout(cfg: fusion.FusionConfig, meta: Mapping[str, Any]) -> tuple[int, int, int]:
  """(seq_len, max_questions, q) for a model dir.

  seq_len: the checkpoint's tokenizer_model_max_length (import_torch keeps the authors'
  config.json in meta), else MODEL_DIR_MAX_SEQ_LEN, capped by the LLM's
  max_position_embeddings. q: the evaluation default (query_len.eval_q).
  """
  torch_cfg = meta.get("torch_config") or {}
  seq = int(torch_cfg.get("tokenizer_model_max_length") or MODEL_DIR_MAX_SEQ_LEN)
  return (min(seq, int(cfg.llm.max_position_embeddings)), MODEL_DIR_MAX_QUESTIONS,
          query_len.eval_q(cfg.query_len))


def _run_tokenizer_path(config: Any) -> str:
  return str(config.data.get("tokenizer") or "")


def load_model(path: str, *, step: int | None = None, dtype: str | None = None,
               seq_len: int | None = None) -> LoadedModel:
  """The model at `path`: a training workdir (newest checkpoint, or `step`) or a model dir.

  Args:
    path: training workdir or model dir (see the module docstring).
    step: checkpoint step of a training run; must be None for a model dir.
    dtype: compute dtype override ('float32' | 'bfloat16'); None keeps the model's.
    seq_len: the longest prompt layout to accept (LoadedModel.seq_len), at most the LLM's
      max_position_embeddings; None keeps the run's / model dir's.

  Raises:
    FileNotFoundError / ValueError with one line naming the directory and what it lacks.
  """
  from fusion_jax.convert import model_dir as md
  remote = "://" in path  # e.g. gs://: a training workdir (read through etils.epath)
  if not remote:
    if not os.path.isdir(path):
      raise FileNotFoundError(f"{path}: no such directory (expected a training workdir or a "
                              "model dir written by import_torch / import_hf)")
    path = os.path.abspath(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if not remote and md.is_model_dir(path):
    if step is not None:
      raise ValueError(f"{path} is a model dir (one set of weights); --step applies to "
                       "training workdirs only")
    params, cfg = md.load_model_dir(path, shardings=device)
    meta = md.load_model_meta(path)
    layout_len, max_questions, q = model_dir_layout(cfg, meta)
    tok = os.path.join(path, md.TOKENIZER_NAME)
    cfg = with_compute_dtype(cfg, dtype)
    return _with_seq_len(LoadedModel(
        cfg=cfg, params=params_for_config(params, cfg), kind="model_dir", path=path, step=None,
        seq_len=layout_len, max_questions=max_questions, q=q,
        tokenizer_path=tok if os.path.isdir(tok) else "", meta=meta), seq_len)
  from fusion_jax.infer import workdir as wd
  if not wd.checkpoint_steps(path):
    raise FileNotFoundError(
        f"{path} is neither a model dir (no {md.CONFIG_NAME} + {md.PARAMS_NAME}/; written by "
        "import_torch / import_hf) nor a training workdir with a complete checkpoint (nothing "
        "under checkpoints/)")
  if step is not None and step not in wd.checkpoint_steps(path):
    raise FileNotFoundError(f"{path}: no complete checkpoint at step {step}; steps: "
                            f"{wd.checkpoint_steps(path)}")
  params, cfg, config, step = wd.load_run(path, step)
  from fusion_jax.task.fusion import run_data_config
  d = run_data_config(config)  # the run's DataConfig: its layout, eval q and image root
  cfg = with_compute_dtype(cfg, dtype)
  return _with_seq_len(LoadedModel(
      cfg=cfg, params=params_for_config(params, cfg), kind="workdir", path=path, step=step,
      seq_len=d.seq_len, max_questions=d.max_questions, q=d.q_eval, image_root=d.image_root,
      tokenizer_path=_run_tokenizer_path(config), config=config), seq_len)


def _with_seq_len(model: LoadedModel, seq_len: int | None) -> LoadedModel:
  """`model` accepting prompts of up to `seq_len` positions (None: unchanged)."""
  if seq_len is None:
    return model
  limit = model.cfg.llm.max_position_embeddings
  if not 0 < seq_len <= limit:
    raise ValueError(f"--seq_len {seq_len}: must be in 1..{limit} (the LLM's "
                     "max_position_embeddings)")
  return dataclasses.replace(model, seq_len=seq_len)


def tokenizer_dir(model: LoadedModel) -> str | None:
  """The directory holding the model's tokenizer files (for copying them), or None."""
  p = model.tokenizer_path
  if not p:
    return None
  return p if os.path.isdir(p) else os.path.dirname(p)
