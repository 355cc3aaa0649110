"""AdamW with per-module learning rates and freezing, warmup + cosine schedule, clipping.

Parameter paths are the '/'-joined dict keys of the params tree, e.g.
`vision/encoder/layers_3/mlp/fc1/kernel`. `optim.rules` is an ordered list of
`(regex, action)`; the first regex that `re.search`-matches a path decides, unmatched paths use
the base learning rate. `action` is a float multiplier of the base learning rate, or 'freeze'.

  rules = (("^vision_tower/", 0.1),    # FUSION stage 1.5: vision tower at lr / 10
           ("^mm_projector/", 1.0),
           ("^embed", "freeze"))

Each distinct action becomes one label of `optax.multi_transform`. Frozen parameters map to
`optax.set_to_zero()`, which keeps no state: frozen modules carry no Adam moments. Global-norm
clipping runs before the split, over all (trainable) gradients together, as in the HF Trainer
the original recipe used.

Schedule (HF `get_cosine_schedule_with_warmup`): linear 0 -> lr over the first
ceil(warmup_frac * num_steps) updates, then cosine to `end_lr_frac * lr` at `num_steps`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import optax

FREEZE = "freeze"


def path_str(path: Sequence[Any]) -> str:
  """Key path (from jax.tree_util) -> 'a/b/c'."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def check_rules(rules: Sequence[Sequence[Any]]) -> list[tuple[re.Pattern, str | float]]:
  """optim.rules as (compiled regex, 'freeze' | multiplier); ValueError names a bad rule."""
  out = []
  for i, rule in enumerate(rules or ()):
    if len(rule) != 2:
      raise ValueError(f"optim.rules[{i}] = {rule!r}: expected (regex, lr multiplier or 'freeze')")
    pattern, action = rule
    try:
      compiled = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"optim.rules[{i}]: bad regex {pattern!r}: {e}") from None
    if isinstance(action, str):
      if action != FREEZE:
        raise ValueError(f"optim.rules[{i}]: action {action!r} must be a float or '{FREEZE}'")
    else:
      action = float(action)
      if action < 0:
        raise ValueError(f"optim.rules[{i}]: lr multiplier {action} must be >= 0")
    out.append((compiled, action))
  return out


def _label(action: str | float) -> str:
  return FREEZE if action == FREEZE else f"lr_x{float(action)!r}"


def param_labels(params: Any, rules: Sequence[Sequence[Any]]) -> Any:
  """Tree of labels ('freeze' or 'lr_x<multiplier>') with the structure of `params`."""
  compiled = check_rules(rules)

  def label(path, _):
    s = path_str(path)
    for pattern, action in compiled:
      if pattern.search(s):
        return _label(action)
    return _label(1.0)

  return jax.tree_util.tree_map_with_path(label, params)


def frozen_mask(labels: Any) -> Any:
  """Tree of bools: True where the parameter is trainable."""
  return jax.tree.map(lambda l: l != FREEZE, labels)


def warmup_steps(optim_cfg: Mapping[str, Any], num_steps: int) -> int:
  """ceil(warmup_frac * num_steps) like HF (`warmup_steps` > 0 overrides)."""
  explicit = int(optim_cfg.get("warmup_steps", 0) or 0)
  if explicit > 0:
    return explicit
  return int(math.ceil(float(optim_cfg.get("warmup_frac", 0.0)) * num_steps))


def make_schedule(optim_cfg: Mapping[str, Any], num_steps: int) -> optax.Schedule:
  """Base learning rate as a function of the update count (0-based)."""
  lr = float(optim_cfg["lr"])
  warm = warmup_steps(optim_cfg, num_steps)
  kind = optim_cfg.get("schedule", "cosine")
  end = lr * float(optim_cfg.get("end_lr_frac", 0.0))
  if warm > num_steps:
    raise ValueError(f"optim: {warm} warmup steps exceed the {num_steps} training steps; "
                     "lower optim.warmup_frac / optim.warmup_steps")
  if kind == "cosine":
    if num_steps <= warm:  # degenerate: warmup only
      return optax.linear_schedule(0.0, lr, max(warm, 1))
    return optax.warmup_cosine_decay_schedule(0.0, lr, warm, num_steps, end_value=end)
  if kind == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, max(warm, 1)), optax.constant_schedule(lr)], [warm])
  raise ValueError(f"optim.schedule={kind!r}: expected 'cosine' or 'constant'")


def _adamw(optim_cfg: Mapping[str, Any], schedule: optax.Schedule, mult: float) -> optax.GradientTransformation:
  exclude = optim_cfg.get("decay_exclude", "") or ""
  mask = None
  if exclude:
    pattern = re.compile(exclude)
    mask = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: not pattern.search(path_str(path)), p)
  return optax.adamw(
      learning_rate=lambda count: schedule(count) * mult,
      b1=float(optim_cfg.get("b1", 0.9)), b2=float(optim_cfg.get("b2", 0.999)),
      eps=float(optim_cfg.get("eps", 1e-8)),
      weight_decay=float(optim_cfg.get("weight_decay", 0.0)), mask=mask)


def make_optimizer(optim_cfg: Mapping[str, Any], params: Any, num_steps: int
                   ) -> tuple[optax.GradientTransformation, Any]:
  """The optax transformation for `params` (concrete or abstract) and its label tree.

  Args:
    optim_cfg: config.optim (lr, warmup_frac | warmup_steps, schedule, end_lr_frac, b1, b2,
      eps, weight_decay, decay_exclude, clip_norm, rules).
    params: the (unboxed) params tree; only its structure and paths are used.
    num_steps: total optimizer updates (the cosine reaches its end value there).

  Returns:
    (tx, labels): labels is a tree of 'freeze' / 'lr_x<m>' strings like `params`.
  """
  labels = param_labels(params, optim_cfg.get("rules", ()))
  schedule = make_schedule(optim_cfg, num_steps)
  transforms: dict[str, optax.GradientTransformation] = {}
  for label in sorted(set(jax.tree.leaves(labels))):
    if label == FREEZE:
      transforms[label] = optax.set_to_zero()
    else:
      transforms[label] = _adamw(optim_cfg, schedule, float(label[len("lr_x"):]))
  chain = []
  clip = float(optim_cfg.get("clip_norm", 0.0) or 0.0)
  if clip > 0:
    chain.append(optax.clip_by_global_norm(clip))
  chain.append(optax.multi_transform(transforms, labels))
  return optax.chain(*chain), labels


def label_summary(params: Any, labels: Any) -> dict[str, int]:
  """{label: number of parameters} for the startup log."""
  out: dict[str, int] = {}
  for p, l in zip(jax.tree.leaves(params), jax.tree.leaves(labels)):
    out[l] = out.get(l, 0) + int(math.prod(p.shape))
  return out
