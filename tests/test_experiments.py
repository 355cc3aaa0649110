"""Every experiments/*.py config (every arg) builds, validates against a device count matching
its mesh, and its model shapes resolve abstractly (jax.eval_shape: the 3B / 8B presets without
allocating them) with every sharded parameter dim divisible by its mesh axes. Plus the paper
recipe's numbers (docs/model.md §10) and the command line override path."""
import glob
import importlib.util
import math
import os

from absl import flags
import flax.linen as nn
import jax
import pytest
from ml_collections import config_flags

from fusion_jax.models import param_layout, query_len
from fusion_jax.train import config as config_lib
from fusion_jax.train import optimizer as optim_lib
from fusion_jax.train import task as task_lib
from fusion_jax.task.fusion import STAGES, FusionTask, fusion_config_from, recipe_num_steps
from fusion_jax.parallel.sharding import normalize_rules

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(p for p in glob.glob(os.path.join(ROOT, "experiments", "*.py"))
                     if not os.path.basename(p).startswith("_"))
PAPER = ("fusion_3b", "fusion_8b", "fusion_x_3b", "fusion_x_8b")
# Hypothetical slices for the paper configs: v5p-128 and v5p-256 (64 / 128 chips, 4 per host).
PAPER_DEVICES = (64, 128)
CHIPS_PER_HOST = 4


def load(path):
  name = "exp_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def get_config(path, arg):
  mod = load(path)
  return mod.get_config(arg) if arg is not None else mod.get_config()


def cases():
  out = []
  for path in EXPERIMENTS:
    args = getattr(load(path), "CONFIG_ARGS", None) or (None,)
    for arg in args:
      out.append(pytest.param(path, arg, id=f"{os.path.basename(path)}:{arg or ''}"))
  return out


_ABSTRACT: dict[str, object] = {}


def abstract_params(task):
  """Boxed abstract params of the task's model, cached per model (stages share one)."""
  key = repr(task.cfg) if hasattr(task, "cfg") else repr(getattr(task, "model_cfg", task))
  if key not in _ABSTRACT:
    _ABSTRACT[key] = jax.eval_shape(task.init_params, jax.random.key(0))
  return _ABSTRACT[key]


def undivisible(boxed, config, sizes):
  """'path: dim d of size n over mesh axes (..)=k' for every sharded dim k does not divide."""
  rules = normalize_rules(config.rules)
  bad = []
  flat = jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for p, leaf in flat:
    if not isinstance(leaf, nn.Partitioned):
      continue
    mesh_axes = nn.logical_to_mesh_axes(leaf.names, rules)
    for d, (n, axes) in enumerate(zip(leaf.value.shape, mesh_axes)):
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      k = math.prod(sizes[a] for a in axes)
      if n % k:
        bad.append(f"{optim_lib.path_str(p)}: dim {d} of size {n} over {axes}={k}")
  return bad


@pytest.mark.parametrize("path,arg", cases())
def test_experiment_builds_validates_and_resolves_shapes(path, arg):
  config = get_config(path, arg)
  paper = config.task == "fusion" and config.model.preset in PAPER
  device_counts = PAPER_DEVICES if paper else (8,)
  task = task_lib.make_task(config)  # needs neither the tokenizer nor the data
  boxed = abstract_params(task)
  params = nn.unbox(boxed)
  num_steps = config_lib.resolve_num_steps(config, getattr(task, "num_examples", None))
  assert num_steps > 0
  tx, labels = optim_lib.make_optimizer(config.optim, params, num_steps)
  assert tx is not None
  for n in device_counts:
    hosts = max(1, n // CHIPS_PER_HOST) if paper else 1
    sizes = config_lib.validate_config(config, num_devices=n, process_count=hosts)
    assert math.prod(sizes.values()) == n
    assert undivisible(boxed, config, sizes) == []
    if isinstance(task, FusionTask):
      dc = task.data_config(hosts)
      assert dc.batch_size * hosts == config.global_batch
  if isinstance(task, FusionTask):
    cfg = task.cfg
    query_len.check(cfg.query_len, "config.model", window=cfg.window_size,
                    mosaic_side=2 * cfg.vision.grid_size)
    dc = task.data_config(1)
    assert (dc.num_image_tokens, dc.template, dc.query_len) == (
        cfg.num_image_tokens, cfg.template, tuple(cfg.query_len))
    assert task.flops_per_token() > 0


@pytest.mark.parametrize("preset", PAPER)
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_paper_recipe(preset, stage):
  """docs/model.md §10: batch / lr / tower lr / max len / init chain per stage, all trainable."""
  config = get_config(os.path.join(ROOT, "experiments", f"{preset}.py"), stage)
  want = {"stage1": (256, 2e-5, 2e-5, 2048), "stage1_5": (128, 2e-5, 2e-6, 4096),
          "stage2": (128, 1e-5, 1e-6, 3072 if preset == "fusion_x_8b" else 4096)}[stage]
  gb, lr, vision_lr, seq_len = want
  assert (config.global_batch, config.optim.lr, config.data.seq_len) == (gb, lr, seq_len)
  o = config.optim
  assert (o.schedule, o.warmup_frac, o.weight_decay) == ("cosine", 0.03, 0.0)
  assert (config.num_epochs, config.num_steps) == (1.0, 0)
  assert config.compute_dtype == "bfloat16" and config.remat_policy != "none"
  assert config.model.preset == preset and config.mesh.tensor == 1
  (rule,) = o.rules
  assert rule[0] == "^vision_tower/" and rule[1] == pytest.approx(vision_lr / lr)
  task = FusionTask(config)
  assert task.num_examples == STAGES[stage].num_examples
  assert config_lib.resolve_num_steps(config, task.num_examples) == recipe_num_steps(stage)
  assert recipe_num_steps("stage1") == 39063  # 10M / 256
  # The vision tower (and only it) gets the multiplier; nothing is frozen.
  params = nn.unbox(abstract_params(task))
  summary = optim_lib.label_summary(params, optim_lib.param_labels(params, o.rules))
  assert "freeze" not in summary
  tower = sum(math.prod(x.shape) for x in jax.tree.leaves(params["vision_tower"]))
  if vision_lr != lr:
    assert summary[f"lr_x{rule[1]!r}"] == tower
    assert summary["lr_x1.0"] == sum(summary.values()) - tower
  # Stage chain: 1 from the imported base model, 1.5 from 1, 2 from 1.5.
  prev = STAGES[stage].previous
  if prev:
    assert config.init_from.endswith(f"/{preset}/{prev}")
  else:
    assert config.init_from.endswith(f"{preset}_base")
    assert config.data.tokenizer == config.init_from + "/tokenizer"


@pytest.mark.parametrize("preset,llm,vision,total", [
    ("fusion_3b", (3.7e9, 3.9e9), (3.9e8, 4.1e8), (4.9e9, 5.3e9)),
    ("fusion_8b", (8.0e9, 8.1e9), (3.9e8, 4.1e8), (9.7e9, 10.2e9)),
    ("fusion_x_3b", (3.7e9, 3.9e9), (1.0e9, 1.2e9), (5.6e9, 6.0e9)),
    ("fusion_x_8b", (8.0e9, 8.1e9), (1.0e9, 1.2e9), (10.4e9, 10.9e9)),
])
def test_paper_model_sizes(preset, llm, vision, total):
  """Phi-3.5-mini 3.8B / Llama-3.1 8.0B, SigLIP so400m 0.4B / SigLIP2 giant 1.1B (L-1 layers),
  plus projectors and 10 interaction layers."""
  task = FusionTask(get_config(os.path.join(ROOT, "experiments", f"{preset}.py"), "stage1"))
  assert task.cfg.llm.scan_layers and task.cfg.vision.scan_layers  # paper configs scan
  # Counted in the unrolled layout (scanned: interaction layers sit inside llm/'s groups).
  params = jax.eval_shape(param_layout.to_unscanned, nn.unbox(abstract_params(task)))
  count = lambda t: sum(math.prod(x.shape) for x in jax.tree.leaves(t))  # noqa: E731
  assert llm[0] < count(params["llm"]) < llm[1]
  assert vision[0] < count(params["vision_tower"]) < vision[1]
  assert total[0] < count(params) < total[1]
  assert len([k for k in params if k.startswith("interaction_")]) == 10


def test_fusion_task_model_side_needs_no_files():
  config = get_config(os.path.join(ROOT, "experiments", "fusion_3b.py"), "stage2")
  assert not os.path.exists(config.data.tokenizer)
  task = FusionTask(config)
  assert task.cfg.llm.vocab_size == 32013 and task.cfg.llm.dtype == "bfloat16"
  # The paper configs pick, per stage, the lightest remat that AOT showed fits v5p-128 with room
  # (the files' comments); the 8B ones (Llama-3's 128k vocabulary) take the loss in 8 chunks.
  lighter = "dots_with_no_batch_dims_and_attention"
  assert task.cfg.vision.remat_policy == task.cfg.llm.remat_policy == lighter
  for name, stage1, chunks in (("fusion_3b", lighter, 1), ("fusion_x_3b", lighter, 1),
                               ("fusion_8b", "dots_with_no_batch_dims", 8),
                               ("fusion_x_8b", "full", 8)):
    for stage in ("stage1", "stage1_5", "stage2"):
      c = get_config(os.path.join(ROOT, "experiments", f"{name}.py"), stage)
      assert c.remat_policy == (stage1 if stage == "stage1" else lighter), (name, stage)
      assert c.loss_chunks == chunks, (name, stage)
      assert c.data.seq_len % c.loss_chunks == 0, (name, stage)
  with pytest.raises(FileNotFoundError):
    task.tokenizer  # noqa: B018  (loaded on first use, i.e. by the data side)
  with pytest.raises(ValueError, match="unknown stage"):
    get_config(os.path.join(ROOT, "experiments", "fusion_3b.py"), "stage3")
  with pytest.raises(ValueError, match="disagrees with the model"):
    config.data.num_image_tokens = 576
    task.data_config(1)
  with pytest.raises(ValueError, match="config.model.overrides"):
    fusion_config_from({"preset": "tiny", "overrides": {"no_such_field": 1}})


def test_command_line_overrides():
  """`--config experiments/fusion_8b.py:stage1_5 --config.KEY=VALUE` as __main__ parses it."""
  argv = ["prog", f"--config={os.path.join(ROOT, 'experiments', 'fusion_8b.py')}:stage1_5",
          "--config.data.mixture=/data/mix.yaml", "--config.num_steps=7",
          "--config.mesh.fsdp=16", "--config.mesh.data=4"]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  c = fv.config
  assert (c.data.mixture, c.num_steps, c.global_batch) == ("/data/mix.yaml", 7, 128)
  assert config_lib.validate_config(c, num_devices=64, process_count=16) == {
      "data": 4, "fsdp": 16, "tensor": 1}


def test_mesh_limits_documented_in_the_recipe():
  """What the stage_config comment says: fsdp > 128 breaks the vision width (1152), and the odd
  Phi-3.5 vocabulary (32013) forbids tensor > 1, while Llama-3's (128258) allows tensor 2."""
  config = get_config(os.path.join(ROOT, "experiments", "fusion_3b.py"), "stage1")
  boxed = abstract_params(FusionTask(config))
  bad = undivisible(boxed, config, {"data": 1, "fsdp": 256, "tensor": 1})
  assert any(b.startswith("vision_tower/") and "1152" in b for b in bad)
  bad = undivisible(boxed, config, {"data": 1, "fsdp": 32, "tensor": 2})
  assert bad and all("32013" in b for b in bad)
  config8 = get_config(os.path.join(ROOT, "experiments", "fusion_8b.py"), "stage1")
  assert undivisible(abstract_params(FusionTask(config8)), config8,
                     {"data": 1, "fsdp": 32, "tensor": 2}) == []


def test_partial_remat_reports_no_hardware_flops():
  """AOT and training report HFU only where the formula knows the recompute (full / none)."""
  from fusion_jax import aot
  config = get_config(os.path.join(ROOT, "experiments", "fusion_3b.py"), "stage2")
  assert FusionTask(config).step_flops(2)["hardware"] is None  # a partial policy
  config.remat_policy = "full"
  full = FusionTask(config).step_flops(2)
  assert full["hardware"] > full["model"] > 0
  report = dict(compiled=True, topology="v5p-128", topology_desc="v5p:4x4x4", devices=64,
                device_kind="TPU v5", mesh={"fsdp": 64}, global_batch=128, microbatches=1,
                remat_policy="dots_with_no_batch_dims", compile_s=1.0, compile_cpu_s=2.0,
                arguments_gib=1.0, outputs_gib=1.0, alias_gib=1.0, temporaries_gib=40.0,
                generated_code_gib=0.3, per_chip_peak_gib=42.8, hbm_gib=95.0, fits=True,
                model_flops_per_step=full["model"], hardware_flops_per_step=None,
                flops_per_step=1e15)
  assert "n/a under a partial remat policy" in aot.format_report(report)
