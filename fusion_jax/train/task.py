"""What the generic trainer needs from a model + data: the `Task` protocol, a registry, a toy task.

The trainer (fusion_jax.train.loop) knows nothing about FUSION. A task supplies:

  batch_axes            {batch key: logical axes}, e.g. {"input_ids": ("batch", "length")};
                        every array the data iterator yields must be listed (the leading axis
                        is the batch axis and is split over hosts and microbatches)
  loss_weights          {part: weight}; total loss = sum_k weight_k * sum_k / denominator_k
  init_params(rng)      the 'params' collection, leaves boxed with nn.Partitioned logical
                        names (nn.with_logical_partitioning); plain arrays are replicated
  loss_fn(params, batch, rng) -> (sums, aux)
                        sums: {part: fp32 scalar SUM over the (micro)batch}, e.g. summed token
                        NLL; aux: {name: scalar} extra metrics, SUMMED over microbatches (an
                        aux 'tokens' = real tokens in the batch drives tokens/s and MFU)
  loss_denominators(batch) -> {part: scalar}
                        the normaliser of each part over the whole GLOBAL batch, computed from
                        the batch alone (e.g. number of supervised tokens). Because it does not
                        depend on the parameters the trainer computes it before accumulating
                        microbatch gradients, which makes k microbatches exactly equal to one
                        step on the k-times batch (mean-of-means would not be).
  make_data_iterator(process_index, process_count)
                        this host's iterator of batches of global_batch / process_count
                        examples (dicts of NumPy arrays) with get_state() -> JSON-able dict,
                        set_state(state), optional `counters` ({name: int}, e.g. skipped
                        samples per reason) and optional close()
  flops_per_token()     training FLOPs per token (forward + backward) for MFU, or None
  adapt_params(tree)    optional: a stored params tree (init_from) in this task's parameter
                        layout (FUSION: unrolled <-> scanned layers)
  num_examples          dataset size for config.num_epochs, or None

Register a task factory `factory(config) -> Task` under a name in `TASKS` (or give
config.task as 'package.module:factory'); a 'module:attr' string is imported on first use:

  from fusion_jax.train import task as task_lib
  task_lib.register_task("fusion", "fusion_jax.train.fusion_task:FusionTask")

Registered here: 'toy' (ToyTask below) and 'fusion' (lazy, fusion_jax/train/fusion_task.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol, runtime_checkable

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion_jax.models import remat as remat_lib
from fusion_jax.models.attention import causal_mask, dot_product_attention
from fusion_jax.parallel import cross_entropy as ce_lib
from fusion_jax.parallel.sharding import constrain
from fusion_jax.train.config import resolve_dtype

Batch = Mapping[str, Any]


@runtime_checkable
class DataIterator(Protocol):
  """Host batches with a resumable state."""

  def __next__(self) -> dict[str, np.ndarray]: ...

  def get_state(self) -> dict[str, Any]: ...

  def set_state(self, state: Mapping[str, Any]) -> None: ...


@runtime_checkable
class Task(Protocol):
  """See the module docstring."""

  batch_axes: Mapping[str, tuple[str | None, ...]]
  loss_weights: Mapping[str, float]
  num_examples: int | None

  def init_params(self, rng: jax.Array) -> Any: ...

  def loss_fn(self, params: Any, batch: Batch, rng: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]: ...

  def loss_denominators(self, batch: Batch) -> dict[str, jax.Array]: ...

  def make_data_iterator(self, process_index: int, process_count: int) -> DataIterator: ...

  def flops_per_token(self) -> float | None: ...


TaskFactory = Callable[[ml_collections.ConfigDict], Task]
# name -> factory, or 'module:attr' imported on first use (keeps heavy imports lazy).
TASKS: dict[str, TaskFactory | str] = {}


def register_task(name: str, factory: TaskFactory | str) -> None:
  """Makes `config.task = name` build `factory(config)`."""
  TASKS[name] = factory


def _import(spec: str) -> TaskFactory:
  module, _, attr = spec.partition(":")
  if not attr:
    raise ValueError(f"task factory {spec!r} must look like 'package.module:factory'")
  return getattr(importlib.import_module(module), attr)


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The task named by config.task (a registered name or 'module:factory')."""
  name = config.task
  if name in TASKS:
    factory = TASKS[name]
    factory = _import(factory) if isinstance(factory, str) else factory
  elif ":" in name:
    factory = _import(name)
  else:
    raise ValueError(f"config.task={name!r} is not registered; known tasks: {sorted(TASKS)} "
                     "(or give 'package.module:factory')")
  return factory(config)


# ----------------------------------------------------------------------------- toy task


@dataclasses.dataclass(frozen=True)
class ToyModelConfig:
  """A tiny causal transformer LM (pre-RMSNorm, MHA, GELU MLP, untied unembedding)."""
  vocab_size: int = 64
  d_model: int = 32
  num_layers: int = 2
  num_heads: int = 4
  head_dim: int = 8
  mlp_dim: int = 64
  dtype: Any = jnp.float32
  remat_policy: str = "none"


def _init(std: float, names: tuple[str | None, ...]):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def _norm(name: str, dtype) -> nn.RMSNorm:
  return nn.RMSNorm(dtype=dtype, param_dtype=jnp.float32, name=name,
                    scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)))


class Proj(nn.Module):
  """Bias-free projection contracting the last `n_in` input axes: (..., *in) -> (..., *out)."""
  shape_in: tuple[int, ...]
  shape_out: tuple[int, ...]
  names: tuple[str, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _init(0.02, self.names), self.shape_in + self.shape_out,
                        jnp.float32)
    n = len(self.shape_in)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=n)


class ToyBlock(nn.Module):
  """Pre-norm decoder block: x + attn(norm(x)); x + mlp(norm(x))."""
  cfg: ToyModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    cfg, dt = self.cfg, self.cfg.dtype
    hd = (cfg.num_heads, cfg.head_dim)
    h = _norm("attn_norm", dt)(x)
    q, k, v = [constrain(Proj((cfg.d_model,), hd, ("embed", "heads", "head_dim"), dt, name=n)(h),
                         ("batch", "length", "heads", "head_dim"))
               for n in ("query", "key", "value")]
    a = dot_product_attention(q, k, v, mask)
    a = Proj(hd, (cfg.d_model,), ("heads", "head_dim", "embed"), dt, name="out")(a)
    x = constrain(x + a, ("batch", "length", "embed"))
    h = _norm("mlp_norm", dt)(x)
    h = nn.Dense(cfg.mlp_dim, dtype=dt, param_dtype=jnp.float32, name="fc1",
                 kernel_init=_init(0.02, ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))(h)
    h = constrain(nn.gelu(h), ("batch", "length", "mlp"))
    h = nn.Dense(cfg.d_model, dtype=dt, param_dtype=jnp.float32, name="fc2",
                 kernel_init=_init(0.02, ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(h)
    return constrain(x + h, ("batch", "length", "embed"))


class ToyLM(nn.Module):
  """input_ids (B, S), token_mask (B, S) -> logits (B, S, V)."""
  cfg: ToyModelConfig

  @nn.compact
  def __call__(self, input_ids: jax.Array, token_mask: jax.Array) -> jax.Array:
    cfg = self.cfg
    table = self.param("embed", _init(0.02, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model),
                       jnp.float32)
    # One-hot matmul instead of a gather: partitions cleanly with the table sharded on both
    # axes (a sharded gather makes XLA replicate); fine for a toy vocabulary.
    x = jax.nn.one_hot(input_ids, cfg.vocab_size, dtype=cfg.dtype) @ table.astype(cfg.dtype)
    x = constrain(x, ("batch", "length", "embed"))
    mask = causal_mask(token_mask)
    block = remat_lib.remat(ToyBlock, cfg.remat_policy)
    for i in range(cfg.num_layers):
      x = block(cfg, name=f"block_{i}")(x, mask)
    x = _norm("final_norm", cfg.dtype)(x)
    logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=cfg.dtype, param_dtype=jnp.float32,
                      name="unembed", kernel_init=_init(0.02, ("embed", "vocab")))(x)
    return constrain(logits, ("batch", "length", "vocab"))


class ToySource:
  """Deterministic synthetic sequences: arithmetic progressions mod vocab (learnable).

  Sample i: length L_i in [S/2, S], tokens (a + d j) % V for j < L_i, zeros after; labels
  supervise positions 2 .. L_i - 1 (so denominators differ between samples).
  """

  def __init__(self, num_samples: int, seq_len: int, vocab_size: int, seed: int):
    self.n, self.s, self.v, self.seed = num_samples, seq_len, vocab_size, seed

  def __len__(self) -> int:
    return self.n

  def __getitem__(self, i: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([self.seed, int(i)])
    length = int(rng.integers(self.s // 2, self.s + 1))
    a, d = int(rng.integers(0, self.v)), int(rng.integers(1, 4))
    j = np.arange(self.s)
    valid = j < length
    ids = np.where(valid, (a + d * j) % self.v, 0).astype(np.int32)
    labels = np.where(valid & (j >= 2), ids, ce_lib.IGNORE_INDEX).astype(np.int32)
    return dict(input_ids=ids, token_mask=valid, labels=labels,
                sample_id=np.int32(i))


class ToyIterator:
  """Batches from a grain iterator; state = grain state + counters.

  `delay_s` sleeps before each batch (simulates slow input; tests use it to kill a run
  mid-way deterministically).
  """

  def __init__(self, it: grain.DatasetIterator, delay_s: float = 0.0):
    self._it = it
    self._delay = float(delay_s)
    self.counters: dict[str, int] = {"samples": 0}

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._delay:
      time.sleep(self._delay)
    batch = next(self._it)
    self.counters["samples"] += int(batch["sample_id"].shape[0])
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"grain": self._it.get_state(), "counters": dict(self.counters)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self._it.set_state(state["grain"])
    self.counters = {k: int(v) for k, v in state.get("counters", {}).items()}

  def close(self) -> None:
    close = getattr(self._it, "close", None)
    if close is not None:
      close()


def toy_config() -> ml_collections.ConfigDict:
  """Defaults of config.model / config.data for the toy task."""
  model = ml_collections.ConfigDict(dict(
      vocab_size=64, d_model=32, num_layers=2, num_heads=4, head_dim=8, mlp_dim=64))
  data = ml_collections.ConfigDict(dict(num_samples=512, seq_len=16, seed=0, shuffle=True,
                                        delay_s=0.0))
  return ml_collections.ConfigDict(dict(model=model, data=data))


class ToyTask:
  """A 2-layer transformer LM on synthetic sequences, exercising the whole trainer."""

  loss_weights = {"ce": 1.0}

  def __init__(self, config: ml_collections.ConfigDict):
    m, d = config.model, config.data
    self.model_cfg = ToyModelConfig(
        vocab_size=int(m.vocab_size), d_model=int(m.d_model), num_layers=int(m.num_layers),
        num_heads=int(m.num_heads), head_dim=int(m.head_dim), mlp_dim=int(m.mlp_dim),
        dtype=resolve_dtype(config.compute_dtype), remat_policy=config.remat_policy)
    self.model = ToyLM(self.model_cfg)
    self.rules = tuple(tuple(r) for r in config.rules)
    self.data_cfg = d
    self.global_batch = int(config.global_batch)
    self.num_examples = int(d.num_samples)
    self.batch_axes = dict(input_ids=("batch", "length"), token_mask=("batch", "length"),
                           labels=("batch", "length"), sample_id=("batch",))

  def init_params(self, rng: jax.Array) -> Any:
    s = int(self.data_cfg.seq_len)
    ids = jnp.zeros((1, s), jnp.int32)
    return self.model.init(rng, ids, jnp.ones((1, s), bool))["params"]

  def loss_fn(self, params: Any, batch: Batch, rng: jax.Array
              ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    del rng  # no dropout in the toy model
    logits = self.model.apply({"params": params}, batch["input_ids"], batch["token_mask"])
    total, _ = ce_lib.cross_entropy(logits, batch["labels"], rules=self.rules)
    return {"ce": total}, {"tokens": jnp.sum(batch["token_mask"]).astype(jnp.float32)}

  def loss_denominators(self, batch: Batch) -> dict[str, jax.Array]:
    targets = ce_lib.shift_labels(batch["labels"])
    return {"ce": jnp.sum(targets != ce_lib.IGNORE_INDEX).astype(jnp.float32)}

  def make_data_iterator(self, process_index: int, process_count: int) -> ToyIterator:
    d = self.data_cfg
    src = ToySource(int(d.num_samples), int(d.seq_len), self.model_cfg.vocab_size, int(d.seed))
    ds = grain.MapDataset.source(src)
    if d.shuffle:
      ds = ds.shuffle(seed=int(d.seed))
    ds = ds.repeat(None)[process_index::process_count]
    ds = ds.batch(self.global_batch // process_count, drop_remainder=True)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    return ToyIterator(iter(it), delay_s=float(d.delay_s))

  def flops_per_token(self) -> float:
    c = self.model_cfg
    s = int(self.data_cfg.seq_len)
    per_layer = 4 * c.d_model * c.num_heads * c.head_dim + 2 * c.d_model * c.mlp_dim
    matmul = c.num_layers * per_layer + c.d_model * c.vocab_size
    attention = 2 * c.num_layers * s * c.num_heads * c.head_dim  # QK^T and PV per token
    return 6.0 * matmul + 6.0 * attention


register_task("toy", ToyTask)
# Imported on first use so that the toy task never pulls in the FUSION model and data stack.
TASKS.setdefault("fusion", "fusion_jax.train.fusion_task:FusionTask")
