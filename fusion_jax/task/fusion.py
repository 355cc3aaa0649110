"""The FUSION training task: model config + data pipeline + the loss as the trainer sees it.

Config (besides the common trainer fields of fusion_jax/train/config.py):

  config.model.preset      a name of fusion_jax.models.presets (e.g. "fusion_3b", "tiny")
  config.model.overrides   FusionConfig fields to replace (ConfigDict; nested `llm` / `vision`
                           dicts override fields of those sub-configs; None = the preset's).
                           `model_config(preset, ...)` lists every field of the preset, so any
                           of them can be set on the command line, e.g.
                           --config.model.overrides.vision.image_size=64
  config.data.*            fusion_jax.data.pipeline.DataConfig fields (paths / mixture /
                           tfds_name, image_root, seq_len, max_questions, ...) plus
  config.data.tokenizer    a tokenizer file or directory (fusion_jax.data.tokenizer)
  config.data.num_examples dataset size in records for config.num_epochs (0 = unknown: then
                           config.num_steps must be set)

Fields the model fixes (image_size, num_image_tokens, template, max_instruct_len, query_len)
are derived from the model config; setting them to something else in config.data is an error.
The model side (`cfg`, `init_params`, `loss_fn`) never touches the tokenizer or the data, so a
config can be checked and its shapes evaluated (`jax.eval_shape(task.init_params, key)`) on a
machine without the dataset; the tokenizer is loaded when the data iterator is built.

The loss is docs/model.md §8 split into sums the trainer normalises over the global batch:
ce / supervised tokens + lambda * (text_map / instruction tokens + vision_map / patches).

The paper's training recipe (docs/model.md §10) is `STAGES` + `stage_config` (fusion_jax.stages, the
mechanism the main job's stages use too), used by experiments/fusion_*.py.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fusion_jax import stages as stages_lib
from fusion_jax.data import pipeline as data_pipeline
from fusion_jax.data.tokenizer import TEMPLATE_PAD_TOKENS, Tokenizer, load_tokenizer
from fusion_jax.models import flops as flops_lib
from fusion_jax.models import batch_spec, fusion
from fusion_jax.models import mapping_loss, param_layout, query_len
from fusion_jax.models.presets import get_preset
from fusion_jax.parallel import cross_entropy as ce_lib
from fusion_jax.parallel.sharding import normalize_rules
from fusion_jax.task import preflight as fusion_preflight
from fusion_jax.train import task as task_lib
from fusion_jax.train.config import base_config

# Batch keys and their logical axes (the leading axis is split over hosts and microbatches).
BATCH_AXES: dict[str, tuple[str | None, ...]] = batch_spec.logical_axes()
_MODEL_FIXED = ("image_size", "num_image_tokens", "template", "max_instruct_len", "query_len")
# config.data keys that are not DataConfig fields: read here (tokenizer, num_examples) or by
# the evaluation job (heldout).
_TASK_DATA_KEYS = ("tokenizer", "num_examples", "heldout")


def _plain(x: Any) -> Any:
  return x.to_dict() if isinstance(x, ml_collections.ConfigDict) else x


_SCALARS = (bool, int, float, str, tuple)


def _typed_fields(obj: Any) -> dict[str, ml_collections.FieldReference]:
  """{field: FieldReference(None, type of the preset's value)} for the dataclass `obj`'s
  scalar and tuple fields (None-valued and structured ones, e.g. rope_scaling, are left out)."""
  out = {}
  for f in dataclasses.fields(obj):
    value = getattr(obj, f.name)
    if isinstance(value, _SCALARS):
      out[f.name] = ml_collections.FieldReference(None, field_type=type(value))
  return out


def model_config(preset: str, **overrides: Any) -> ml_collections.ConfigDict:
  """config.model for `preset`: `overrides` lists EVERY field of the preset (None = keep the
  preset's value), set here from `overrides` (llm / vision: dicts of their fields).

  Listing them all lets the command line override any of them (ml_collections config flags
  only set keys that exist): --config.model.overrides.vision.image_size=64.
  """
  base = get_preset(preset)
  fields = ml_collections.ConfigDict(_typed_fields(base))
  fields.llm = ml_collections.ConfigDict(_typed_fields(base.llm))
  fields.vision = ml_collections.ConfigDict(_typed_fields(base.vision))
  for key, value in overrides.items():
    if key in ("llm", "vision") and isinstance(value, Mapping):
      for k, v in value.items():
        fields[key][k] = v
    else:
      fields[key] = value
  # scan_layers: scan the decoder (interaction layers inside the groups) and the tower
  # (fusion_jax.models.param_layout); None = the preset's (unrolled) layout.
  return ml_collections.ConfigDict(dict(
      preset=preset, overrides=fields,
      scan_layers=ml_collections.FieldReference(None, field_type=bool)))


def _given(d: Mapping[str, Any]) -> dict[str, Any]:
  """The overrides that are set (None = the preset's value)."""
  return {k: v for k, v in d.items() if v is not None}


def fusion_config_from(model: ml_collections.ConfigDict | Mapping[str, Any],
                       compute_dtype: str | None = None,
                       remat_policy: str | None = None) -> fusion.FusionConfig:
  """FusionConfig from config.model (preset + overrides) and the trainer's dtype / remat.

  compute_dtype / remat_policy apply to both the LLM and the tower unless config.model.overrides
  sets them explicitly for one of them. Needs no tokenizer and no data.
  """
  model = _plain(model)
  if not model.get("preset"):
    raise ValueError("config.model.preset is empty; name a preset of fusion_jax.models.presets "
                     "(e.g. 'fusion_3b', 'tiny')")
  overrides = _given(dict(_plain(model.get("overrides") or {})))
  try:
    base = get_preset(model["preset"])
  except ValueError as e:
    raise ValueError(f"config.model.preset: {e}") from None
  llm = _given(dict(_plain(overrides.pop("llm", None)) or {}))
  vision = _given(dict(_plain(overrides.pop("vision", None)) or {}))
  scan = model.get("scan_layers")
  for sub in (llm, vision):
    if compute_dtype:
      sub.setdefault("dtype", compute_dtype)
    if remat_policy:
      sub.setdefault("remat_policy", remat_policy)
    if scan is not None:
      sub.setdefault("scan_layers", bool(scan))
  if "query_len" in overrides:
    overrides["query_len"] = query_len.parse(overrides["query_len"])
  try:
    return dataclasses.replace(
        base, llm=dataclasses.replace(base.llm, **llm) if llm else base.llm,
        vision=dataclasses.replace(base.vision, **vision) if vision else base.vision,
        **overrides)
  except TypeError as e:  # an unknown field name
    raise ValueError(f"config.model.overrides: {e}; see FusionConfig / LLMConfig / "
                     "VisionConfig for the field names") from None


def _norm(v: Any) -> Any:
  return tuple(v) if isinstance(v, (list, tuple)) else v


def data_config_from(data: ml_collections.ConfigDict | Mapping[str, Any],
                     cfg: fusion.FusionConfig, per_host_batch: int) -> data_pipeline.DataConfig:
  """DataConfig with the model-fixed fields derived from `cfg` (mismatches are errors)."""
  d = dict(_plain(data))
  for key in _TASK_DATA_KEYS:
    d.pop(key, None)
  fixed = dict(image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens,
               template=cfg.template, max_instruct_len=cfg.max_instruct_len,
               query_len=tuple(cfg.query_len))
  for key in _MODEL_FIXED:
    value = d.get(key)
    if value in (None, "", ()):
      continue
    value = query_len.parse(value) if key == "query_len" else _norm(value)
    if value != fixed[key]:
      raise ValueError(f"config.data.{key}={d[key]!r} disagrees with the model ({fixed[key]!r}); "
                       f"remove it from config.data: the model config decides it")
  d.update(fixed, batch_size=per_host_batch)
  return data_pipeline.as_data_config(d)


def load_task_tokenizer(path: str, template: str) -> Tokenizer:
  """The tokenizer at `path` with `template`'s pad token, as training loads it."""
  return load_tokenizer(path, pad_token=TEMPLATE_PAD_TOKENS[template])


def tokenizer_vocab(tok: Tokenizer, embedding_rows: int | None = None) -> dict[str, int]:
  """The model fields the tokenizer fixes, {"vocab_size", "pad_token_id"} of config.model.
  overrides.llm (the one rule; the data side reads the same tokenizer): an imported model's
  `embedding_rows` (exactly its tokenizer's tokens), else len(tok) rounded up to a multiple of
  8 (it splits over any tensor axis up to 8); pad_token_id is the tokenizer's pad id."""
  vocab = int(embedding_rows) if embedding_rows else -(-len(tok) // 8) * 8
  return {"vocab_size": vocab, "pad_token_id": tok.pad_id}


class FusionTask:
  """fusion_jax.train.task.Task for FUSION (see the module docstring)."""

  batch_axes = BATCH_AXES
  preflight = staticmethod(fusion_preflight.check)  # startup checks (train/preflight.py)

  def __init__(self, config: ml_collections.ConfigDict):
    # The config is read here (config.data again by data_config, which validates it).
    self.config = config
    self.remat_policy = config.get("remat_policy")
    self.microbatches = max(int(config.get("microbatches", 1) or 1), 1)
    self.loss_chunks = int(config.get("loss_chunks", 1) or 1)
    seq_len = int(config.data.get("seq_len", 0) or 0)
    if self.loss_chunks > 1 and seq_len % self.loss_chunks:
      raise ValueError(f"config.loss_chunks={self.loss_chunks} must divide data.seq_len "
                       f"{seq_len} (the chunks split each row's tokens); pick a divisor of it")
    self.tokenizer_path = str(config.data.get("tokenizer", "") or "")
    self.cfg = fusion_config_from(config.model, config.get("compute_dtype"), self.remat_policy)
    # Mesh-axis lists (a config read back from JSON) become tuples, as Linen expects.
    self.rules = tuple(normalize_rules(config.rules))
    self.global_batch = int(config.global_batch)
    self.loss_weights = {"ce": 1.0}
    if self.cfg.mapping_loss and self.cfg.mapping_weight:
      if self.cfg.text_guidance:
        self.loss_weights["text_map"] = float(self.cfg.mapping_weight)
      self.loss_weights["vision_map"] = float(self.cfg.mapping_weight)
    n = int(config.data.get("num_examples", 0) or 0)
    self.num_examples = n if n > 0 else None
    self._tokenizer: Tokenizer | None = None

  @property
  def tokenizer(self) -> Tokenizer:
    """config.data.tokenizer with the template's pad token, loaded once (data side only)."""
    if self._tokenizer is None:
      path = self.tokenizer_path
      if not path:
        raise ValueError("config.data.tokenizer is empty; point it to the LLM's tokenizer "
                         "directory or file (e.g. <import_hf output>/tokenizer)")
      tok = load_task_tokenizer(path, self.cfg.template)
      if len(tok) > self.cfg.llm.vocab_size:
        raise ValueError(f"tokenizer {path} has {len(tok)} tokens but the model vocabulary is "
                         f"{self.cfg.llm.vocab_size}; set config.model.overrides.llm.vocab_size")
      self._tokenizer = tok
    return self._tokenizer

  def data_config(self, process_count: int) -> data_pipeline.DataConfig:
    """This host's DataConfig (batch = global_batch / process_count)."""
    if self.global_batch % process_count:
      raise ValueError(f"global_batch {self.global_batch} is not divisible by the "
                       f"{process_count} hosts")
    return data_config_from(self.config.data, self.cfg, self.global_batch // process_count)

  def init_params(self, rng: jax.Array) -> Any:
    return fusion.init(rng, self.cfg, fusion.init_batch(self.cfg))["params"]

  def _step_shape(self, q: int | None) -> tuple[int, int, int, int]:
    """(seq_len, max_questions, q, samples per row) of the largest batch the data produces."""
    dc = self.data_config(1)
    return dc.seq_len, dc.max_questions, query_len.eval_q(self.cfg.query_len, q), dc.samples_per_row

  def abstract_batch(self, rows: int, q: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of a training batch of `rows` (largest q unless given): what the AOT
    fit check (fusion_jax.aot) lowers the step with."""
    s, lq, q, p = self._step_shape(q)
    one = fusion.example_batch(self.cfg, batch_size=1, seq_len=s, max_questions=lq, q=q,
                               seed=None, samples_per_row=p)
    return {k: jax.ShapeDtypeStruct((rows,) + one[k].shape[1:], one[k].dtype)
            for k in self.batch_axes}

  def step_flops(self, rows: int, q: int | None = None) -> dict[str, Any]:
    """Analytical FLOPs of one train step of `rows` rows (fusion_jax.models.flops); 'hardware'
    is None under a partial remat policy (it recomputes a share the formula does not know)."""
    s, lq, q, p = self._step_shape(q)
    policy = self.remat_policy or self.cfg.llm.remat_policy
    out = flops_lib.train_step_flops(self.cfg, batch=rows, seq_len=s, q=q,
                                     max_questions=lq * p, remat=policy != "none",
                                     images_per_row=p, segments_per_row=p,
                                     loss_chunks=self.loss_chunks)
    if policy not in ("full", "none"):
      out["hardware"] = None
    return out

  def adapt_params(self, params: Any) -> Any:
    """A stored tree (init_from: model dirs, other runs) in this model's layer layout."""
    return param_layout.to_config_layout(params, self.cfg)

  def loss_fn(self, params: Any, batch: Mapping[str, jax.Array], rng: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    del rng  # FUSION trains without dropout
    # The loss projects the final hidden states itself (chunks, the head's padded width).
    hidden, out = fusion.apply(params, batch, self.cfg, train=True, logits=False)
    terms = mapping_loss.loss_terms(
        hidden, batch["labels"], out["instruct_embeds"], out["instruct_feats"],
        batch["instructs_mask"], out["patch_embeds"], out["projected_back"],
        sample_mask=fusion.vision_map_samples(batch, self.cfg),
        text_map="text_map" in self.loss_weights, vision_map="vision_map" in self.loss_weights,
        rules=self.rules, head=fusion.lm_head(params, self.cfg, self.loss_chunks))
    sums = {k: total for k, (total, _) in terms.items()}
    tokens = jnp.sum(batch["token_mask"]).astype(jnp.float32)
    # Per-step metrics (aux values add up over microbatches): samples in the batch, and the
    # packing efficiency real tokens / row tokens as this microbatch's share of the mean.
    k = self.microbatches
    p = batch["has_image"].shape[1]
    aux = {"tokens": tokens,
           "samples": jnp.sum(batch_spec.sample_mask(batch["segment_ids"], p)).astype(jnp.float32),
           "packing_efficiency": tokens / (batch["token_mask"].size * k)}
    return sums, aux

  def loss_denominators(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    targets = ce_lib.shift_labels(batch["labels"])
    dens = {"ce": jnp.sum(targets != ce_lib.IGNORE_INDEX).astype(jnp.float32)}
    n = jnp.float32(self.cfg.vision.num_patches)
    if "text_map" in self.loss_weights:
      dens["text_map"] = jnp.sum(batch["instructs_mask"]).astype(jnp.float32)
    if "vision_map" in self.loss_weights:
      samples = jnp.sum(fusion.vision_map_samples(batch, self.cfg))
      dens["vision_map"] = samples.astype(jnp.float32) * n
    return dens

  def make_data_iterator(self, process_index: int, process_count: int
                         ) -> data_pipeline.DataIterator:
    return data_pipeline.make_pipeline(self.data_config(process_count), self.tokenizer,
                                       process_index=process_index,
                                       process_count=process_count, train=True)

  def check_batch(self, batch: Mapping[str, Any]) -> None:
    """ValueError unless a host batch follows the batch contract (models/batch_spec.py) with
    this config's sizes: seq_len, question slots, samples per row, image size."""
    where = "the data pipeline's first batch"
    dims = batch_spec.check_batch(batch, where=where)
    s, lq, _, p = self._step_shape(None)
    want = dict(seq_len=s, max_questions=lq, samples_per_row=p,
                image_size=self.cfg.vision.image_size)
    for name, size in want.items():
      if getattr(dims, name) != size:
        raise ValueError(f"{where}: {name} is {getattr(dims, name)}, the config's {size} "
                         "(config.data and config.model disagree)")

  def flops_per_token(self) -> float:
    """Model FLOPs (forward + backward) per sequence position of one row: step_flops (the
    formula of fusion_jax.models.flops) over seq_len; the trainer's MFU numerator."""
    return self.step_flops(1)["model"] / self._step_shape(None)[0]


def run_data_config(config: ml_collections.ConfigDict) -> data_pipeline.DataConfig:
  """The DataConfig of a FUSION run's config on one host: what evaluation and inference read
  (seq_len, max_questions, q_eval, image_root, paths) instead of the raw config.data."""
  return data_config_from(config.data, fusion_config_from(config.model),
                          int(config.get("global_batch") or 1))


task_lib.register_task("fusion", FusionTask)


# --------------------------------------------------------------- docs/model.md §10 recipe


@dataclasses.dataclass(frozen=True)
class PaperStage:
  """One row of the paper's training recipe (docs/model.md §10)."""
  title: str
  dataset: str          # the authors' dataset name (the placeholder mixture path uses it)
  num_examples: int     # documented dataset size: 1 epoch = ceil(num_examples / global_batch)
  global_batch: int
  lr: float
  vision_lr: float      # vision tower learning rate (an optim.rules multiplier of lr)
  seq_len: int
  previous: str         # the stage whose weights this one starts from ('' = the base model)

  def stage(self, name: str, data_root: str, seq_len: int | None = None) -> stages_lib.Stage:
    """This row as a fusion_jax.stages.Stage: the config keys it sets."""
    return stages_lib.Stage(name, previous=self.previous, overrides={
        "data.mixture": f"{data_root}/{self.dataset}/mixture.yaml",
        "data.num_examples": self.num_examples,  # num_steps = ceil(epochs * this / batch)
        "data.seq_len": int(seq_len or self.seq_len),
        "global_batch": self.global_batch,
        "optim.lr": self.lr,
        "optim.rules": ((VISION_TOWER_RULE, round(self.vision_lr / self.lr, 12)),)})


STAGES: dict[str, PaperStage] = {
    "stage1": PaperStage("Foundational Semantic Alignment", "FUSION-Pretrain-10M", 10_000_000,
                         256, 2e-5, 2e-5, 2048, ""),
    "stage1_5": PaperStage("Contextual Multimodal Fusion", "FUSION-5M-Stage1.5", 5_000_000,
                           128, 2e-5, 2e-6, 4096, "stage1"),
    "stage2": PaperStage("Visual Instruction Tuning", "FUSION-7M-Stage2", 7_000_000,
                         128, 1e-5, 1e-6, 4096, "stage1_5"),
}
VISION_TOWER_RULE = "^vision_tower/"


def paper_config(preset: str, *, image_root: str, base_model: str) -> ml_collections.ConfigDict:
  """What the paper's stages share (docs/model.md §10) for a FUSION preset; each stage sets its
  data, batch, learning rates and max length on top (PaperStage.stage).

  AdamW (wd 0), cosine with 3% warmup, 1 epoch, bf16 compute with fp32 master weights, full
  remat, every module trainable. init_from is the base model (the first stage's start).
  """
  c = base_config()
  c.task = "fusion"
  c.model = model_config(preset)
  # Scanned layers: compile time and program size independent of depth (docs/performance.md,
  # "Fit on TPU slices").
  c.model.scan_layers = True
  c.data = ml_collections.ConfigDict(dict(
      mixture="",                          # set by each stage
      image_root=image_root,
      tokenizer=f"{base_model}/tokenizer",
      num_examples=0,                      # set by each stage
      seq_len=0,                           # set by each stage
      # User turns with latent slots per sample (later turns are cut with their tokens).
      max_questions=16,
      seed=0, shuffle=True,
      worker_count=8, read_threads=8, read_buffer=64, prefetch=2,
      # Records' image paths stay inside image_root unless this is set (absolute paths).
      allow_absolute_image_paths=False,
      # Several samples per row (fusion_jax/data/packing.py); the AOT check compiles P slots.
      packing=False, max_samples_per_row=4))
  # FSDP over every chip (tested for 64 and 128 chips: v5p-128 / v5p-256). Every sharded
  # parameter dim must divide by its mesh axes: the vision width (1152 SigLIP, 1536 SigLIP2)
  # and the projector input (3 x that) limit fsdp to 128, as does the global batch of stages
  # 1.5 / 2 (128 examples over data x fsdp shards). Larger slices: tensor 2 or a larger batch.
  # tensor must stay 1 for FUSION 3B / X-3B: their vocabulary (Phi-3.5's 32011 + 2 vision
  # tokens = 32013) is odd and the embedding and LM head split it over tensor (the loss pads
  # its width, the parameters cannot; Llama-3's 128258 allows tensor 2); more needs a
  # vocabulary padded at import.
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  c.optim.schedule = "cosine"
  c.optim.warmup_frac = 0.03
  c.optim.weight_decay = 0.0
  c.microbatches = 1        # raise (e.g. 2, 4) if the activations do not fit
  c.num_steps = 0           # 0 = num_epochs over data.num_examples
  c.num_epochs = 1.0
  c.checkpoint.every = 1000
  c.checkpoint.keep_last = 2
  c.log_every = 10
  c.seed = 0
  c.compute_dtype = "bfloat16"
  c.remat_policy = "full"
  c.init_from = base_model
  return c


def stage_config(preset: str, stage: str, *, data_root: str, image_root: str, base_model: str,
                 run_root: str, seq_len: Mapping[str, int] | None = None
                 ) -> ml_collections.ConfigDict:
  """The experiment config of one paper stage (docs/model.md §10) for a FUSION preset:
  `paper_config` with the stage's row of STAGES (fusion_jax.stages, as the main job's stages).

  Args:
    preset: fusion_jax.models.presets name (fusion_3b, fusion_8b, fusion_x_3b, fusion_x_8b).
    stage: 'stage1' | 'stage1_5' | 'stage2' (keys of STAGES).
    data_root: directory holding one folder per dataset with its mixture YAML:
      <data_root>/<PaperStage.dataset>/mixture.yaml.
    image_root: where relative image paths of the JSON records resolve.
    base_model: the stage-1 start, a model dir written by `python -m
      fusion_jax.convert.import_hf --preset <preset> --out <base_model>` (base LLM + SigLIP,
      new modules random); its tokenizer/ is the training tokenizer.
    run_root: stage workdirs are <run_root>/<stage>; stages 1.5 and 2 start from the previous
      stage's workdir (params only, fresh optimizer; modules missing there start from random
      init).
    seq_len: per-stage max length overrides (FUSION-X 8B stage 2: 3072).
  """
  if stage not in STAGES:
    raise ValueError(f"unknown stage {stage!r}; choose one of {sorted(STAGES)} "
                     "(e.g. --config experiments/fusion_3b.py:stage1)")
  base = paper_config(preset, image_root=image_root, base_model=base_model)
  recipe = [row.stage(name, data_root, (seq_len or {}).get(name)) for name, row in STAGES.items()]
  plan = stages_lib.plan(base, recipe, lambda name: f"{run_root}/{name}")
  return dict((name, c) for name, c, _ in plan)[stage]


def recipe_num_steps(stage: str) -> int:
  """Optimizer steps of one epoch of the stage's documented dataset at its global batch."""
  s = STAGES[stage]
  return math.ceil(s.num_examples / s.global_batch)
