"""Optax optimisers and learning-rate schedules from `config.optimizer`."""

import optax

from bigjax import losses

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
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
