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
  """c with every 'a.b' = v set (dotted keys as in --config.a.b=v, through ml_collections'
  update_from_flattened_dict, the path config flags take); returns c."""
  c.update_from_flattened_dict(overrides)
  return c
