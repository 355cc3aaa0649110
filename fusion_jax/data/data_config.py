"""`DataConfig`: every setting of the input pipeline (fusion_jax/data/pipeline.py), validated
when it is built."""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from fusion_jax import config_util
from fusion_jax.models import query_len as query_len_lib


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Everything the input pipeline needs (one of `paths`, `mixture`, `tfds_name` is required).

  Attributes:
    paths: LLaVA .json (one array) / .jsonl files and/or ArrayRecord shards (file, directory
      or glob), all records used.
    mixture: a mixture YAML in the authors' format (see `sources`), sampling
      all | first:N | end:N | random:N, N or N%.
    tfds_name, tfds_data_dir, tfds_split: a prepared TFDS dataset read with
      `tfds.data_source` (e.g. "fusion_synth", see `synth_tfds`), no TensorFlow needed.
    image_root: directory relative image paths of JSON records resolve against (a mixture
      entry's own image_root wins; '' = the working directory). Embedded images (ArrayRecord,
      TFDS) need none. A path that leaves it (`..`, symlinks) is skipped as
      `image_outside_root`.
    allow_absolute_image_paths: accept absolute image paths in records (off: they are
      skipped as `image_outside_root`, so a record cannot make the trainer open any file).
    pad_final_batch: training with finite num_epochs: the short last batch is trained, padded
      with empty rows (no token, no label, no image, no instruction). Off: it is not trained
      and its samples are counted as `dropped_remainder`. Turn it on only for a task whose
      every loss term and denominator ignores empty rows; FUSION's vision_map with
      vision_map_text_only counts every row (packing has its own empty-slot mask).
    template: conversation template, "phi_3" or "llama_3" (docs/model.md §9).
    seq_len: S, tokens per sequence (image and latent slots included); longer samples are
      truncated per docs/model.md §6.
    max_questions: Lq, user turns per sample that get latent slots / question positions.
    max_instruct_len: T, bound on the concatenated instruction tokens (docs/model.md §4).
    image_size: H = W of every static_hd crop (384).
    fast_images: JPEG draft decoding + reducing_gap resizes (see `images`; about 3x faster on
      large photos, pixels within ~0.4/255 on average of the authors' path). Off = exact.
    num_image_tokens: N image slots per image sample (729 SigLIP, 576 SigLIP2).
    query_len: q candidates (perfect squares); training draws one per batch from
      (seed, batch index).
    eval_q: the fixed q used when train=False; None = max(query_len).
    batch_size: rows per HOST batch (global batch = batch_size * process_count); one sample
      per row unless packing.
    packing: put several samples into each row of seq_len tokens (fusion_jax/data/packing.py;
      batch contract in fusion_jax/models/batch_spec.py). Training batches then hold a varying
      number of samples; the loss is the same as for those samples unpacked.
    max_samples_per_row: P, the most samples one row holds when packing (every sample slot
      costs one image encoding whether used or not: size it near the expected samples per
      row; `python -m fusion_jax.data.packing_plan --config ...` prices each P on your data).
      Unpacked batches have P = 1.
    packing_buffer: samples the packer chooses from (0 = 2 x batch_size x
      max_samples_per_row); larger packs tighter and holds more decoded images in memory.
    seed: shuffle seed, q-draw seed and mixture random:N seed.
    shuffle: globally shuffle (training); evaluation never shuffles.
    num_epochs: passes over the data; None = forever. Evaluation does exactly one.
    shard_drop_remainder: give every host the same number of records by dropping the last
      len % process_count records (off by default: the shards' union is the whole set).
    worker_count: grain worker processes for decoding (0 = in the main process).
    worker_buffer_size: batches each worker prepares ahead.
    read_threads: threads per worker (or in the main process) decoding samples; PIL
      decoding/resizing releases the GIL so threads scale on multi-core hosts.
    read_buffer: samples each reader prefetches.
    prefetch: laid-out batches buffered by a background thread in the main process (0 = off).
    strict: raise the first BadSample instead of skipping it (data debugging). Fix-ups
      (a leading gpt turn dropped, ...) are normalisations, not errors: counted in both modes.
    log_skips: how many skipped samples per reason to log with their file:line (then only
      counted).
  """

  paths: tuple[str, ...] = ()
  mixture: str = ""
  tfds_name: str = ""
  tfds_data_dir: str = ""
  tfds_split: str = "train"
  image_root: str = ""
  allow_absolute_image_paths: bool = False
  pad_final_batch: bool = False
  template: str = "phi_3"
  seq_len: int = 2048
  max_questions: int = 8
  max_instruct_len: int = 256
  image_size: int = 384
  fast_images: bool = False
  num_image_tokens: int = 729
  query_len: tuple[int, ...] = query_len_lib.CANDIDATES
  eval_q: int | None = None
  batch_size: int = 8
  packing: bool = False
  max_samples_per_row: int = 4
  packing_buffer: int = 0
  seed: int = 0
  shuffle: bool = True
  num_epochs: int | None = None
  shard_drop_remainder: bool = False
  worker_count: int = 0
  worker_buffer_size: int = 2
  read_threads: int = 4
  read_buffer: int = 32
  prefetch: int = 2
  strict: bool = False
  log_skips: int = 20

  def __post_init__(self):
    if isinstance(self.paths, str):
      object.__setattr__(self, "paths", (self.paths,) if self.paths else ())
    object.__setattr__(self, "paths", tuple(self.paths))
    object.__setattr__(self, "query_len", query_len_lib.parse(self.query_len))
    given = [n for n, v in (("paths", self.paths), ("mixture", self.mixture),
                            ("tfds_name", self.tfds_name)) if v]
    if len(given) > 1:
      raise ValueError(f"data config: give only one of paths / mixture / tfds_name, got {given}")
    query_len_lib.check(self.query_len, "data config")
    if self.eval_q is not None:
      query_len_lib.side(self.eval_q, "data config: eval_q")
    for name in ("seq_len", "max_questions", "max_instruct_len", "image_size", "batch_size",
                 "max_samples_per_row"):
      if getattr(self, name) <= 0:
        raise ValueError(f"data config: {name} must be > 0, got {getattr(self, name)}")
    if self.packing_buffer < 0:
      raise ValueError("data config: packing_buffer must be >= 0 (0 = the default size)")
    if self.num_image_tokens < 0:
      raise ValueError("data config: num_image_tokens must be >= 0")
    if self.num_epochs is not None and self.num_epochs <= 0:
      raise ValueError("data config: num_epochs must be > 0 or None (forever)")
    if not 0 <= self.seed < 2 ** 32:
      raise ValueError("data config: seed must be in [0, 2**32)")

  @property
  def samples_per_row(self) -> int:
    """P of this pipeline's batches: max_samples_per_row when packing, else 1."""
    return self.max_samples_per_row if self.packing else 1

  @property
  def q_eval(self) -> int:
    return query_len_lib.eval_q(self.query_len, self.eval_q)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
    """From a dict / ml_collections.ConfigDict; unknown keys are an error naming them."""
    return config_util.from_dict(cls, d, "data config")

  def to_dict(self) -> dict[str, Any]:
    return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
            for f in dataclasses.fields(self)}


def as_data_config(cfg: DataConfig | Mapping[str, Any]) -> DataConfig:
  return cfg if isinstance(cfg, DataConfig) else DataConfig.from_dict(cfg)
