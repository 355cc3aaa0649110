"""experiments/fusion_tiny.py with one q candidate, a constant learning rate and a larger Adam
eps, for tests/test_multihost.py: one compiled train step per topology, and a run stopped after
step 2 and resumed for step 3 follows the same schedule as a straight 3-step run.

Usage: --config tests/multihost_config.py (a config file, like experiments/*.py).
"""
import importlib.util
import os

import ml_collections

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "experiments", "fusion_tiny.py")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  del arg
  spec = importlib.util.spec_from_file_location("fusion_tiny_exp", _TINY)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  c.model.overrides.query_len = (1,)
  c.optim.schedule = "constant"
  # Adam's early updates are ~lr * sign(g): with the default eps, an entry whose gradient is
  # ~0 moves by +-lr depending on the rounding of its sum; a larger eps keeps the 2-process
  # vs 1-process comparison about the gradients (as in tests/test_fusion_train.py).
  c.optim.eps = 1e-4
  return c
