"""The training state: one pytree, sharded by the mesh, saved item by item by the checkpointer.

Fields:
  step              int32 ()   optimizer steps taken (skipped non-finite steps included)
  params            fp32 master parameters, plain nested dicts (unboxed)
  opt_state         optax state; frozen parameters have none (optax.set_to_zero)
  rng               uint32 (2,) base key; step s uses fold_in(rng, s), so no key is consumed
                    and a resumed run draws the same randomness as an uninterrupted one
  nonfinite_total   int32 ()   steps skipped because loss or gradients were not finite
  nonfinite_streak  int32 ()   consecutive skipped steps up to now (0 after a good step)
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_total: jax.Array
  nonfinite_streak: jax.Array

  def counters(self) -> dict[str, jax.Array]:
    """The small non-parameter fields (saved together as the 'train' checkpoint item)."""
    return dict(step=self.step, rng=self.rng, nonfinite_total=self.nonfinite_total,
                nonfinite_streak=self.nonfinite_streak)

  def replace_counters(self, counters: dict[str, Any]) -> TrainState:
    return self.replace(**{k: counters[k] for k in
                           ("step", "rng", "nonfinite_total", "nonfinite_streak")})


def create_state(params: Any, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Fresh state at step 0 (call under jit with out_shardings for sharded creation).

  rng: a typed key (jax.random.key) or raw uint32 key data; stored as raw key data.
  """
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      rng=rng.astype(jnp.uint32),
      nonfinite_total=jnp.zeros((), jnp.int32), nonfinite_streak=jnp.zeros((), jnp.int32))


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                    param_shardings: Any, mesh: jax.sharding.Mesh) -> TrainState:
  """NamedShardings for every TrainState leaf.

  Optimizer moments take the sharding of their parameter (optax.tree_map_params finds the
  parameter-shaped leaves); every other leaf (counts, step, rng) is replicated.
  """
  replicated = NamedSharding(mesh, P())
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (multi_transform holes)
  opt_shardings = optax.tree_map_params(
      tx, lambda leaf, s: leaf if masked(leaf) else s, abstract_opt, param_shardings,
      transform_non_params=lambda _: replicated, is_leaf=masked)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings,
                    rng=replicated, nonfinite_total=replicated, nonfinite_streak=replicated)


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any,
                   shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the state: the restore target."""
  shapes = jax.eval_shape(lambda p: create_state(p, tx, jax.random.key(0)), abstract_params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)
