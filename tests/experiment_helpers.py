"""Load experiments/*.py configs in tests and apply dotted-key overrides (like --config.K=V)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_experiment(name: str, arg=None):
  """experiments/<name>.py's get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f"{name}_exp",
                                                os.path.join(ROOT, "experiments", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config() if arg is None else mod.get_config(arg)


def override(c, **overrides):
  """Sets c[a][b] = v for every 'a.b' = v (dotted keys as in --config.a.b=v); returns c."""
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c
