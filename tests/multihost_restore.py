"""One process of a multi-process checkpoint restore, for tests/test_multihost.py.

  python tests/multihost_restore.py WORKDIR STEP OUT_DIR OVERRIDES_JSON

Run on every process with JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID set:
restores checkpoint STEP of WORKDIR (tests/multihost_config.py with the dotted-key overrides)
onto the mesh of all processes' devices, as the trainer's resume does, and writes this
process's view to OUT_DIR/process_<i>.npz (every addressable shard of the params, optimizer
state and counters, keyed '<leaf path>@<shard index>') and OUT_DIR/process_<i>_data.json (the
restored data-iterator state). Compiles no train step.
"""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def shard_key(path: str, index: tuple) -> str:
  """'<leaf path>@0:4,:' for a shard's index (a tuple of slices)."""
  parts = [f"{'' if s.start is None else s.start}:{'' if s.stop is None else s.stop}"
           for s in index]
  return f"{path}@{','.join(parts)}"


def main(workdir: str, step: int, out_dir: str, overrides: dict) -> None:
  from fusion_jax.parallel import distributed
  distributed.initialize()
  import jax
  from experiment_helpers import override
  from fusion_jax.train import checkpoint as ckpt_lib
  from fusion_jax.train.loop import setup
  from multihost_config import get_config

  su = setup(override(get_config(), **overrides))
  ck = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
  state, data_state = ck.restore(step, su.target, restore_data=True)
  ck.close()
  tree = (state.params, state.opt_state, state.counters())
  shards = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    for shard in leaf.addressable_shards:
      shards[shard_key(jax.tree_util.keystr(path), shard.index)] = np.asarray(shard.data)
  i = jax.process_index()
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, f"process_{i}.npz"), **shards)
  with open(os.path.join(out_dir, f"process_{i}_data.json"), "w") as f:
    json.dump(data_state, f)
  print(f"restored checkpoint {step} on process {i} of {jax.process_count()}: "
        f"{len(shards)} shards", flush=True)


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4]))
