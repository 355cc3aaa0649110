r"""Ahead-of-time fit check: compile a config's train step for a Cloud TPU slice on a CPU host.

  python -m fusion_jax.aot --config experiments/fusion_3b.py:stage2 --topology v5p-128 \
      [--out FILE.json] [--hlo_out FILE.hlo.txt] [--config.KEY=VALUE ...]

Compiles, with libtpu's compiler (`pip install libtpu` of the version jax pins; no TPU needed),
the exact step `python -m fusion_jax.train` runs for the config: the same Setup (mesh, logical
rules, optimizer, shardings), the same jitted step (microbatches, remat, dtypes, donation), on
abstract inputs only (nothing is materialised). The batch is the largest the data produces
(the config's longest q). Prints per chip: arguments, outputs, temporaries, generated code, the
peak against the chip's HBM, and FLOPs per step (XLA's count and the analytical model FLOPs of
fusion_jax.models.flops, which the MFU benchmark shares). Exits 1 when it does not fit, naming
the knobs to turn. Modelled on MaxText's train_compile.

Topologies are named as Cloud TPU names them: v5p-N and v4-N count TensorCores (2 per chip),
v5e-N / v5litepod-N and v6e-N count chips. XLA's FLOP count sees a scanned layer stack's body
once, so with scan_layers it undercounts; the analytical figure is the one to compare with.
"""
from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host compiles; libtpu only provides targets
if not any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
  # No TPU on this host: compile-only libtpu loads touch no device, so several may run at once
  # (libtpu otherwise lets one process hold /tmp/libtpu_lockfile).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402



def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing this module for its
  functions must not claim --config, which other entry points define too)."""
  global _CONFIG, _TOPOLOGY, _OUT, _Q, _HLO_OUT
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Experiment config file (experiments/NAME.py[:ARG]).", lock_config=True)
  _TOPOLOGY = flags.DEFINE_string("topology", None,
                                  "Cloud TPU slice, e.g. v5p-128, v5e-256, v6e-64.")
  _OUT = flags.DEFINE_string("out", None, "Write the report as JSON here.")
  _Q = flags.DEFINE_integer("q", 0,
                            "Latents per question to compile for (0 = the config's largest).")
  _HLO_OUT = flags.DEFINE_string(
      "hlo_out", None, "Write the compiled program's optimized HLO text here (the report then "
      "also lists the largest computations: hlo_stats).")

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Generation:
  """A TPU generation: how Cloud TPU counts a slice, its torus rank and HBM per chip."""
  jax_name: str        # get_topology_desc's name prefix
  cores_per_chip: int  # Cloud TPU's slice number counts TensorCores for v4 / v5p
  dims: int            # 3D torus (v4, v5p) or 2D (v5e, v6e)
  hbm_gib: float


GENERATIONS: dict[str, Generation] = {
    "v4": Generation("v4", 2, 3, 32.0),
    "v5p": Generation("v5p", 2, 3, 95.0),
    "v5e": Generation("v5e", 1, 2, 16.0),
    "v5litepod": Generation("v5e", 1, 2, 16.0),
    "v6e": Generation("v6e", 1, 2, 32.0),
}


def chip_grid(chips: int, dims: int) -> tuple[int, ...]:
  """The slice's chip topology, e.g. 64 chips in 3D -> (4, 4, 4); 8 in 2D -> (2, 4)."""
  if chips < 1 or chips & (chips - 1):
    raise ValueError(f"{chips} chips: Cloud TPU slices have a power-of-two chip count")
  if dims == 3 and chips < 8:
    return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1)}[chips]
  grid = [1] * dims
  i = 0
  while math.prod(grid) < chips:
    grid[i % dims] *= 2
    i += 1
  return tuple(sorted(grid))


def parse_topology(name: str) -> tuple[Generation, int, str]:
  """'v5p-128' -> (generation, chips, get_topology_desc name 'v5p:4x4x4')."""
  gen_name, _, count = name.strip().lower().partition("-")
  if gen_name not in GENERATIONS or not count.isdigit():
    raise ValueError(f"--topology {name!r}: name a Cloud TPU slice as GEN-N with GEN in "
                     f"{sorted(GENERATIONS)}, e.g. v5p-128, v5e-256, v6e-64, v4-128")
  gen = GENERATIONS[gen_name]
  n = int(count)
  if n % gen.cores_per_chip:
    raise ValueError(f"--topology {name!r}: {gen_name} slices count TensorCores "
                     f"({gen.cores_per_chip} per chip); N must be a multiple of it")
  chips = n // gen.cores_per_chip
  grid = chip_grid(chips, gen.dims)
  return gen, chips, f"{gen.jax_name}:{'x'.join(map(str, grid))}"


_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _opcode(rhs: str) -> str:
  """'(f32[2], s32[]) tuple(%a, %b), ...' or 'f32[8]{0} add(%a, %b)' -> the opcode."""
  i = 0
  if rhs.startswith("("):  # a tuple shape: skip to its closing parenthesis
    depth = 0
    for i, ch in enumerate(rhs):
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0:
        break
  rest = rhs[i:].split(" ", 1)[-1]
  return rest.split("(", 1)[0].strip()


def hlo_stats(text: str, top: int = 12) -> dict[str, Any]:
  """Per-computation instruction counts of an HLO module's text (`compiled.as_text()`).

  Returns the number of computations and instructions, the instruction count by opcode, and
  the `top` largest computations with their instruction count and most frequent source op
  (the op_name metadata JAX attaches: which model code they come from).
  """
  comps: dict[str, dict[str, Any]] = {}
  opcodes: dict[str, int] = {}
  cur = None
  for line in text.splitlines():
    if not line or line[0] not in " }":
      m = _COMPUTATION.match(line)
      if m:
        cur = comps.setdefault(m.group(1), {"instructions": 0, "op_names": {}})
      continue
    if cur is None or " = " not in line:
      continue
    cur["instructions"] += 1
    op = _opcode(line.split(" = ", 1)[1])
    opcodes[op] = opcodes.get(op, 0) + 1
    name = _OP_NAME.search(line)
    if name:
      key = name.group(1)[:160]
      cur["op_names"][key] = cur["op_names"].get(key, 0) + 1
  largest = sorted(comps.items(), key=lambda kv: -kv[1]["instructions"])[:top]
  return dict(
      computations=len(comps), instructions=sum(c["instructions"] for c in comps.values()),
      opcodes=dict(sorted(opcodes.items(), key=lambda kv: -kv[1])),
      largest=[dict(name=n, instructions=c["instructions"],
                    top_op_name=max(c["op_names"], key=c["op_names"].get, default=""))
               for n, c in largest])


def compile_report(config: Any, topology: str, *, q: int = 0,
                   hlo_out: str | None = None) -> dict[str, Any]:
  """Compiles config's train step for `topology`; returns the report (see module docstring).

  With `hlo_out`, writes the compiled program's optimized HLO text there and adds hlo_stats.
  """
  import jax
  from jax.experimental import topologies

  from fusion_jax.models import attention_kernels
  from fusion_jax.models import flops as flops_lib
  from fusion_jax.train import loop
  from fusion_jax.train import task as task_lib

  gen, chips, desc_name = parse_topology(topology)
  devices = topologies.get_topology_desc(platform="tpu", topology_name=desc_name).devices
  hbm_per_device = gen.hbm_gib * chips / len(devices)
  task = task_lib.make_task(config)
  su = loop.setup(config, task, devices=devices)
  rows = int(config.global_batch)
  batch = task.abstract_batch(rows, q=q or None)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=su.batch_shardings[k])
           for k, v in batch.items()}
  step = su.make_step()
  t0, c0 = time.time(), time.process_time()
  # Trace for TPU ('auto' attention = splash, compiled, as `train` on the slice would run).
  with jax.set_mesh(su.mesh), attention_kernels.target_backend("tpu"):
    lowered = step.jitted.lower(su.target, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      # The TPU compiler refuses programs whose buffers exceed HBM; its message has the need.
      need = re.search(r"required for [^(]*\(([0-9.]+)([KMGT])\)", str(e))
      if "RESOURCE_EXHAUSTED" not in str(e) or not need:
        raise
      compiled = None
      peak = float(need.group(1)) * 1024**"KMGT".index(need.group(2)) * 1024
      logging.info("compiler: %s", str(e).splitlines()[0])
  compile_s, compile_cpu_s = time.time() - t0, time.process_time() - c0
  if compiled is not None:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    code = mem.generated_code_size_in_bytes
    peak = args + outs - alias + temp + code
  else:  # only the compiler's total is known
    args = outs = alias = code = 0
    temp, cost = peak, {}
  model = task.step_flops(rows, q=q or None)
  stats = {}
  if hlo_out and compiled is not None:
    from etils import epath
    text = compiled.as_text()
    epath.Path(hlo_out).write_text(text)
    stats = dict(hlo_stats=hlo_stats(text))
  return dict(
      config=str(getattr(config, "name", "") or ""), topology=topology, topology_desc=desc_name,
      device_kind=devices[0].device_kind, devices=len(devices), chips=chips,
      mesh=dict(su.mesh.shape), global_batch=rows, microbatches=int(config.microbatches),
      remat_policy=str(config.get("remat_policy")), batch_shapes={k: list(v.shape)
                                                                  for k, v in batch.items()},
      compile_s=round(compile_s, 1), compile_cpu_s=round(compile_cpu_s, 1),
      compiled=compiled is not None,
      arguments_gib=args / GIB, outputs_gib=outs / GIB, alias_gib=alias / GIB,
      temporaries_gib=temp / GIB, generated_code_gib=code / GIB,
      per_chip_peak_gib=peak / GIB, hbm_gib=hbm_per_device, fits=bool(peak <= hbm_per_device * GIB),
      flops_per_step=float(cost.get("flops", 0.0)) * len(devices),
      model_flops_per_step=float(model["model"]),
      hardware_flops_per_step=None if model["hardware"] is None else float(model["hardware"]),
      peak_flops_per_chip=flops_lib.peak_flops(devices[0].device_kind), **stats)


def format_report(r: dict[str, Any]) -> str:
  """The human-readable table of a report."""
  if not r["compiled"]:
    return (f"topology {r['topology']} ({r['topology_desc']}), mesh {r['mesh']}: the compiler "
            f"refused the step after {r['compile_s']:.1f} s: it needs "
            f"{r['per_chip_peak_gib']:.2f} GiB per chip of {r['hbm_gib']:.1f} HBM")
  lines = [
      f"topology {r['topology']} ({r['topology_desc']}, {r['devices']} x {r['device_kind']}), "
      f"mesh {r['mesh']}, global batch {r['global_batch']}, microbatches {r['microbatches']}, "
      f"remat {r['remat_policy']}",
      f"compile                {r['compile_s']:10.1f} s wall, {r['compile_cpu_s']:.1f} s CPU",
      "per chip               GiB",
      f"  arguments            {r['arguments_gib']:10.2f}",
      f"  outputs              {r['outputs_gib']:10.2f}   (aliased with arguments: "
      f"{r['alias_gib']:.2f})",
      f"  temporaries          {r['temporaries_gib']:10.2f}",
      f"  generated code       {r['generated_code_gib']:10.3f}",
      f"  peak                 {r['per_chip_peak_gib']:10.2f}   of {r['hbm_gib']:.1f} HBM -> "
      + ("fits" if r["fits"] else "DOES NOT FIT"),
      f"FLOPs per step: model {r['model_flops_per_step']:.3e} (hardware, with remat "
      + ("n/a under a partial remat policy" if r["hardware_flops_per_step"] is None
         else f"{r['hardware_flops_per_step']:.3e}")
      + f"); XLA count {r['flops_per_step']:.3e} "
      "(a scanned stack's body counted once)",
  ]
  return "\n".join(lines)


KNOBS = ("raise --config.microbatches (activations / k), use a larger slice or mesh "
         "(--config.mesh.fsdp / tensor), --config.remat_policy=full, or lower "
         "--config.data.seq_len / --config.global_batch")


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not _TOPOLOGY.value:
    raise app.UsageError("--topology is required (e.g. v5p-128)")
  try:
    parse_topology(_TOPOLOGY.value)
  except ValueError as e:
    print(f"fusion_jax.aot: {e}", file=sys.stderr)
    sys.exit(2)
  try:
    import libtpu  # noqa: F401
  except ImportError:
    print("fusion_jax.aot: libtpu is not installed; `pip install libtpu` of the version jax "
          "pins (pip install --dry-run 'jax[tpu]==<jax version>' names it)", file=sys.stderr)
    sys.exit(2)
  report = compile_report(_CONFIG.value, _TOPOLOGY.value, q=_Q.value, hlo_out=_HLO_OUT.value)
  report["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  print(format_report(report))
  if _OUT.value:
    from etils import epath
    epath.Path(_OUT.value).write_text(json.dumps(report, indent=1))
    logging.info("wrote %s", _OUT.value)
  if not report["fits"]:
    print(f"fusion_jax.aot: does not fit {_TOPOLOGY.value} "
          f"({report['per_chip_peak_gib']:.1f} of {report['hbm_gib']:.1f} GiB per chip); "
          f"{KNOBS}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
