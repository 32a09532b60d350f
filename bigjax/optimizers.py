"""Optax optimisers and learning-rate schedules from `config.optimizer`.

Parameter groups, for fine-tuning: `optimizer.frozen` (regexes of parameter
paths that are not trained) and `optimizer.lr_multipliers` ((regex, factor)
pairs: that group's updates, weight decay included, scaled by the factor)
route each parameter through `optax.multi_transform`. Paths read like
'encoder/layers/mlp/wi/kernel' and a pattern must match a whole path
(`re.fullmatch`); the first matching pattern decides, frozen ones first.
"""

import re
from collections.abc import Sequence

import jax
import optax

from bigjax import losses
from bigjax.errors import UserError
from bigjax.models import axes

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'warmup_cosine')


def make_schedule(opt, total_steps: int) -> optax.Schedule:
  """Learning rate as a function of the step."""
  if opt.schedule == 'constant':
    return optax.constant_schedule(opt.learning_rate)
  # Linear warmup from 0, then cosine to learning_rate * final_lr_fraction at
  # total_steps (optax's decay_steps counts the warmup too).
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=opt.learning_rate,
      warmup_steps=opt.warmup_steps,
      decay_steps=max(total_steps, opt.warmup_steps + 1),
      end_value=opt.learning_rate * opt.final_lr_fraction)


def make_optimizer(opt, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimiser `opt.name` names, with optional global-norm clipping."""
  if opt.name == 'sgd':
    tx = optax.sgd(schedule, momentum=opt.momentum or None,
                   nesterov=opt.nesterov)
  elif opt.name == 'adam':
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps)
  else:  # 'adamw'; names are checked by config_validation.
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                     weight_decay=opt.weight_decay, mask=losses.penalty_mask)
  if opt.frozen or opt.lr_multipliers:
    tx = _parameter_groups(tx, opt)
  if opt.grad_clip_norm > 0:
    # Before the groups: the norm is that of the whole gradient.
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx


def group_of(path: str, opt) -> str:
  """'frozen', 'lr_I' (the I-th multiplier's group) or 'default'."""
  if any(re.fullmatch(p, path) for p in opt.frozen):
    return 'frozen'
  for i, (pattern, _) in enumerate(opt.lr_multipliers):
    if re.fullmatch(pattern, path):
      return f'lr_{i}'
  return 'default'


def _parameter_groups(tx, opt) -> optax.GradientTransformation:
  transforms = {'frozen': optax.set_to_zero(), 'default': tx}
  for i, (_, factor) in enumerate(opt.lr_multipliers):
    transforms[f'lr_{i}'] = optax.chain(tx, optax.scale(factor))
  labels = lambda params: jax.tree_util.tree_map_with_path(  # noqa: E731
      lambda path, _: group_of(axes.path_text(path), opt), params)
  return optax.multi_transform(transforms, labels)


def check_groups(opt, param_paths: Sequence[str]) -> None:
  """Raises UserError for a bad or unmatched pattern (a likely typo)."""
  patterns = [('optimizer.frozen', p) for p in opt.frozen] + [
      ('optimizer.lr_multipliers', pair) for pair in opt.lr_multipliers]
  for key, entry in patterns:
    pattern = entry if isinstance(entry, str) else None
    if key == 'optimizer.lr_multipliers':
      if not (isinstance(entry, (tuple, list)) and len(entry) == 2
              and isinstance(entry[1], (int, float)) and entry[1] >= 0):
        raise UserError(f'config.{key} entry {entry!r} is not a (regex, '
                        "factor >= 0) pair, e.g. ('encoder/.*', 0.1)")
      pattern = entry[0]
    try:
      compiled = re.compile(pattern)
    except (re.error, TypeError) as e:
      raise UserError(f'config.{key} pattern {pattern!r} is not a regular '
                      f'expression ({e})') from None
    if not any(compiled.fullmatch(p) for p in param_paths):
      raise UserError(
          f'config.{key} pattern {pattern!r} matches no parameter; paths look '
          f'like {", ".join(sorted(param_paths)[:3])}, ...')
