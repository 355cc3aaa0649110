"""Load experiments/*.py configs and benchmarks/*.py scripts in tests; apply dotted-key overrides
(like --config.K=V)."""
import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(folder: str, name: str, module_name: str):
  spec = importlib.util.spec_from_file_location(module_name,
                                                os.path.join(ROOT, folder, f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load_experiment(name: str, arg=None):
  """experiments/<name>.py's get_config(arg)."""
  mod = _load("experiments", name, f"{name}_exp")
  return mod.get_config() if arg is None else mod.get_config(arg)


def load_benchmark(name: str):
  """benchmarks/<name>.py as a module (its main is not run)."""
  return _load("benchmarks", name, name)


def override(c, **overrides):
  """c with every 'a.b' = v set (dotted keys as in --config.a.b=v, through ml_collections'
  update_from_flattened_dict, the path config flags take); returns c."""
  c.update_from_flattened_dict(overrides)
  return c
