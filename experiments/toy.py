r"""Toy task: a 2-layer transformer LM on synthetic sequences (tests and smoke runs).

  python -m fusion_jax.train --config experiments/toy.py --workdir /tmp/toy --config.num_steps=50

On 8 devices (e.g. XLA_FLAGS=--xla_force_host_platform_device_count=8 on CPU) add
`--config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2` for a 3-D mesh.

`:ARG` is unused. Every field below is a common trainer field (fusion_jax/train/config.py);
`model` and `data` are read by the toy task (fusion_jax/train/task.py).
"""
from fusion_jax.train.config import base_config
from fusion_jax.train.task import toy_config


def get_config(arg: str | None = None):
  del arg
  c = base_config()
  c.task = "toy"                      # registered task name (fusion_jax.train.task.TASKS)
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
  c.remat_policy = "none"             # fusion_jax.models.remat policy name
  c.trace_batch_key = ""              # e.g. 'sample_id': per-step sample ids to workdir/trace/
  return c
