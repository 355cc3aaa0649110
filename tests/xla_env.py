"""XLA flags of the test processes: pytest's own (conftest.py) and the processes tests start."""

# Tests compile far more than they run. Less LLVM optimisation of the CPU machine code makes
# them about a fifth faster (test_loss_chunks.py + test_fusion_train.py from cold caches, one
# after the other on 2 cores: 150 -> 117 s; the suite 905 s with a warm cache before, 776 s
# with a cold one after). Every HLO pass still runs, so the compiled programs (and what tests
# read from their HLO) are those users get, only less tuned.
FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")


def xla_flags(devices: int, base: str = "") -> str:
  """`base` (e.g. the caller's XLA_FLAGS) plus `devices` virtual CPU devices and FAST_COMPILE,
  each unless `base` already sets it."""
  flags = base.split()
  if not any(f.startswith("--xla_force_host_platform_device_count") for f in flags):
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  for f in FAST_COMPILE:
    if not any(g.split("=")[0] == f.split("=")[0] for g in flags):
      flags.append(f)
  return " ".join(flags)
