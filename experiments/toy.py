r"""Toy task: a 2-layer transformer LM on synthetic sequences (tests and smoke runs).

  python -m fusion_jax.train --config experiments/toy.py --workdir /tmp/toy --config.num_steps=50

On 8 devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) add
`--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` for a 3-D mesh.

`:ARG` is unused. Every field in get_config is a common trainer field
(fusion_jax/train/config.py); `model` and `data` are read by the toy task defined below, which
the trainer imports as `experiments.toy:ToyTask` (run from the repository root). It uses only
the Task protocol (fusion_jax/train/task.py), as any model would.
"""
# No `from __future__ import annotations`: config loaders exec this file without registering it
# in sys.modules, where dataclasses cannot resolve string annotations.
import dataclasses
import time
from collections.abc import Iterator, Mapping
from typing import Any

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fusion_jax.parallel import remat as remat_lib
from fusion_jax.models.attention import causal_mask, dot_product_attention
from fusion_jax.parallel import cross_entropy as ce_lib
from fusion_jax.parallel.sharding import constrain
from fusion_jax.train.config import base_config, resolve_dtype
from fusion_jax.train.task import Batch


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.task = "experiments.toy:ToyTask"  # the task factory, 'module:callable' (ToyTask below)
  toy = toy_config()
  c.model = toy.model                 # vocab_size, d_model, num_layers, num_heads, head_dim, mlp_dim
  c.data = toy.data                   # num_samples, seq_len, seed, shuffle, delay_s (sleep per batch)
  # Mesh: sizes of the data / fsdp / tensor axes; one may be -1 (= the remaining devices).
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  # c.rules: ((logical axis, mesh axes), ...), default fusion_jax.parallel.sharding.DEFAULT_RULES.
  c.optim.lr = 3e-3                   # base learning rate
  c.optim.warmup_frac = 0.1           # linear warmup over ceil(frac * num_steps), then cosine to 0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8   # AdamW moments
  c.optim.weight_decay = 0.0          # decoupled (AdamW); FUSION uses 0
  c.optim.clip_norm = 1.0             # global-norm clipping of the gradients (0 = off)
  c.optim.rules = ()                  # ((regex on 'a/b/kernel' paths, lr multiplier | 'freeze'), ...)
  c.global_batch = 16                 # examples per optimizer step over all hosts
  c.microbatches = 1                  # gradient accumulation: global_batch / microbatches per pass
  c.num_steps = 20                    # 0 = num_epochs over data.num_samples
  c.num_epochs = 1.0
  c.checkpoint.every = 10             # save every N steps (+ at the end and on SIGTERM)
  c.checkpoint.keep_last = 2          # keep the newest K checkpoints ...
  c.checkpoint.keep_every = 0         # ... plus every step that is a multiple of M (0 = none)
  c.checkpoint.async_save = True      # commit in a background thread
  c.log_every = 5                     # progress line / metrics record every N steps
  c.seed = 0                          # init, data order and per-step RNG
  c.init_from = ""                    # run dir to take params from (fresh optimizer)
  c.max_nonfinite = 5                 # abort after K consecutive non-finite steps
  c.compute_dtype = "float32"         # activations / matmuls; params are float32 always
  c.remat_policy = "none"             # fusion_jax.parallel.remat policy name
  c.trace_batch_key = ""              # e.g. 'sample_id': per-step sample ids to workdir/trace/
  return c


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
