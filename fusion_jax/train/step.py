"""The jitted train step: microbatch accumulation, frozen modules, non-finite skip.

One call = one optimizer update on one global batch:

  1. denominators = task.loss_denominators(global batch)          (parameter-free)
  2. the batch is viewed as k microbatches (k, B/k, ...); lax.scan accumulates the gradient of
     sum_k w_k * sums_k(microbatch) / denominators_k w.r.t. the TRAINABLE leaves only (frozen
     leaves are closed over: no gradient buffers, XLA drops their weight-gradient matmuls)
  3. if the loss or the gradient norm is not finite: params and optimizer state are kept, the
     step and the non-finite counters advance; otherwise the optax update is applied
  4. metrics: loss, loss/<part>, aux sums, grad_norm (before clipping), lr, skipped

The state is donated (updated in place) and every input/output has an explicit sharding.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from fusion_jax.parallel.sharding import Rules, normalize_rules
from fusion_jax.train.state import TrainState
from fusion_jax.train.task import Task

Metrics = dict[str, jax.Array]


def batch_shardings(task: Task, mesh: jax.sharding.Mesh, rules: Rules) -> dict[str, NamedSharding]:
  """NamedSharding per batch key from the task's logical batch axes."""
  specs = {k: P(*v) for k, v in task.batch_axes.items()}
  return nn.logical_to_mesh_sharding(specs, mesh, normalize_rules(rules))


def to_global_batch(host_batch: Mapping[str, np.ndarray], shardings: Mapping[str, Any],
                    global_batch: int) -> dict[str, jax.Array]:
  """This host's rows -> global jax.Arrays laid out by `shardings` (works multi-host)."""
  out = {}
  for key, sharding in shardings.items():
    if key not in host_batch:
      raise KeyError(f"the data iterator's batch lacks {key!r} (task.batch_axes lists it); "
                     f"it has {sorted(host_batch)}")
    x = np.asarray(host_batch[key])
    out[key] = jax.make_array_from_process_local_data(
        sharding, x, (global_batch,) + x.shape[1:])
  return out


def split_microbatches(x: jax.Array, k: int) -> jax.Array:
  """(B, ...) -> (k, B/k, ...); microbatch j holds rows j, j+k, j+2k, ...

  Strided rather than contiguous: each device's contiguous slice of the batch then contains
  rows of every microbatch, so every microbatch stays spread over all batch shards and the
  reshape needs no communication.
  """
  b = x.shape[0]
  return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)


def _weighted_loss(task: Task, sums: Mapping[str, jax.Array],
                   denoms: Mapping[str, jax.Array]) -> jax.Array:
  missing = set(task.loss_weights) - set(sums)
  if missing:
    raise ValueError(f"task.loss_fn returned parts {sorted(sums)} but loss_weights names "
                     f"{sorted(task.loss_weights)}; missing {sorted(missing)}")
  total = jnp.zeros((), jnp.float32)
  for name, w in task.loss_weights.items():
    total = total + w * sums[name].astype(jnp.float32) / jnp.maximum(denoms[name], 1.0)
  return total


def make_train_step(task: Task, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh,
                    rules: Rules, *, state_shardings: TrainState, trainable: Any,
                    microbatches: int = 1, schedule: optax.Schedule | None = None,
                    donate: bool = True) -> Callable[[TrainState, Mapping[str, jax.Array]],
                                                     tuple[TrainState, Metrics]]:
  """Builds `step(state, batch) -> (state, metrics)`, jitted with explicit shardings.

  Args:
    task: the Task (loss_fn, loss_denominators, loss_weights, batch_axes).
    tx: optimizer over the full params tree (frozen leaves -> optax.set_to_zero).
    mesh, rules: device mesh and logical axis rules (active while tracing the model).
    state_shardings: TrainState of NamedShardings (fusion_jax.train.state.state_shardings).
    trainable: tree of bools like params, False for frozen leaves (optimizer.frozen_mask).
    microbatches: gradient accumulation steps; the global batch must divide by it.
    schedule: base learning-rate schedule, reported as metrics['lr'].
    donate: donate the state buffers (False keeps the input state alive, e.g. in tests).
  """
  rules = normalize_rules(rules)
  k = int(microbatches)
  mask_leaves, treedef = jax.tree.flatten(trainable)
  b_shardings = batch_shardings(task, mesh, rules)
  replicated = NamedSharding(mesh, P())
  train_shardings = [sh for sh, m in zip(treedef.flatten_up_to(state_shardings.params),
                                         mask_leaves) if m]

  def split(params):
    leaves = treedef.flatten_up_to(params)
    return ([l for l, m in zip(leaves, mask_leaves) if m],
            [l for l, m in zip(leaves, mask_leaves) if not m])

  def merge(train, frozen):
    it_t, it_f = iter(train), iter(frozen)
    return treedef.unflatten([next(it_t) if m else next(it_f) for m in mask_leaves])

  def step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
    with nn.logical_axis_rules(rules):
      denoms = {n: jnp.asarray(d, jnp.float32)
                for n, d in task.loss_denominators(batch).items()}
      step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
      train_p, frozen_p = split(state.params)

      def micro_loss(train_p, mb, rng):
        sums, aux = task.loss_fn(merge(train_p, frozen_p), mb, rng)
        return _weighted_loss(task, sums, denoms), (sums, aux)

      grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
      if k == 1:
        (loss, (sums, aux)), grads = grad_fn(train_p, batch, jax.random.fold_in(step_rng, 0))
      else:
        mbs = {}
        for key, x in batch.items():
          spec = b_shardings[key].spec if key in b_shardings else P()
          mbs[key] = jax.lax.with_sharding_constraint(
              split_microbatches(x, k), NamedSharding(mesh, P(None, *spec)))
        # Shapes of the carried sums come from one abstract evaluation of the loss.
        mb0 = jax.tree.map(lambda x: x[0], mbs)
        _, (sums0, aux0) = jax.eval_shape(micro_loss, train_p, mb0, step_rng)
        zeros = lambda t: jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), t)  # noqa: E731

        def body(carry, inp):
          g_acc, l_acc, s_acc, a_acc = carry
          mb, i = inp
          (l, (s, a)), g = grad_fn(train_p, mb, jax.random.fold_in(step_rng, i))
          add = lambda x, y: x + y.astype(jnp.float32)  # noqa: E731
          return (jax.tree.map(add, g_acc, g), l_acc + l, jax.tree.map(add, s_acc, s),
                  jax.tree.map(add, a_acc, a)), None

        # Accumulators live in the parameters' shardings (FSDP: never a full copy per device).
        g0 = [jax.lax.with_sharding_constraint(jnp.zeros(p.shape, jnp.float32), sh)
              for p, sh in zip(train_p, train_shardings)]
        init = (g0,
                jnp.zeros((), jnp.float32), zeros(sums0), zeros(aux0))
        (grads, loss, sums, aux), _ = jax.lax.scan(body, init, (mbs, jnp.arange(k)))
        grads = [g.astype(p.dtype) for g, p in zip(grads, train_p)]

    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    full_grads = merge(grads, [jnp.zeros_like(p) for p in frozen_p])
    updates, new_opt = tx.update(full_grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
    new_train, _ = split(new_params)
    params = merge(keep(new_train, train_p), frozen_p)  # frozen leaves pass through untouched
    opt_state = keep(new_opt, state.opt_state)
    bad = (~ok).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        nonfinite_total=state.nonfinite_total + bad,
        nonfinite_streak=jnp.where(ok, 0, state.nonfinite_streak + 1).astype(jnp.int32))
    metrics: Metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": bad,
                        "nonfinite_total": new_state.nonfinite_total,
                        "nonfinite_streak": new_state.nonfinite_streak}
    for name, s in sums.items():
      metrics[f"loss/{name}"] = s.astype(jnp.float32) / jnp.maximum(denoms[name], 1.0)
      metrics[f"denominator/{name}"] = denoms[name]
    for name, a in aux.items():
      metrics[name if name == "tokens" else f"aux/{name}"] = jnp.asarray(a, jnp.float32)
    if schedule is not None:
      # optax counts applied updates only; skipped steps do not advance the schedule.
      metrics["lr"] = jnp.asarray(schedule(state.step - state.nonfinite_total), jnp.float32)
    return new_state, metrics

  jitted = jax.jit(step, in_shardings=(state_shardings, b_shardings),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())

  def run(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
    with jax.set_mesh(mesh):
      return jitted(state, batch)

  run.jitted = jitted  # for .lower() / cost analysis
  return run
