"""Test setup: 8 virtual CPU devices for sharding tests, fast compiles (tests/xla_env.py),
float32 matmuls, a compile cache.

XLA_FLAGS must be set before jax is imported anywhere, hence at the top of conftest.
"""
import os

from xla_env import xla_flags  # imports no jax

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = xla_flags(8, os.environ.get("XLA_FLAGS", ""))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

_cache = os.environ.get(
    "FUSION_JAX_TEST_CACHE",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "jax"))
jax.config.update("jax_compilation_cache_dir", _cache)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_default_matmul_precision", "highest")

import absl.flags  # noqa: E402

# grain's multiprocessing reads absl flags; pytest never parses them.
if not absl.flags.FLAGS.is_parsed():
  absl.flags.FLAGS.mark_as_parsed()
