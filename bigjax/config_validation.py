"""Checks a resolved config before any compute or any write to a workdir.

Each failure is a `UserError` whose one-line message names the key, the value
it had, and what is allowed (with the closest valid name for typos).
"""

import dataclasses
import difflib
import math

import jax

from bigjax import losses
from bigjax import optimizers
from bigjax import precision
from bigjax import sharding
from bigjax import tasks
from bigjax.errors import UserError
from bigjax.models import MODELS
from bigjax.models import attention
from bigjax.models import transformer


def _suggest(value, allowed) -> str:
  close = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
  return f" (did you mean '{close[0]}'?)" if close else ''


def check_choice(key: str, value, allowed) -> None:
  """`value` of config key `key` must be one of `allowed`."""
  if value not in allowed:
    names = ', '.join(repr(a) for a in allowed)
    raise UserError(
        f'config.{key}={value!r} is not one of {names}{_suggest(value, allowed)}')


def check_range(key: str, value, *, low=None, high=None,
                low_open=False, high_open=False) -> None:
  """`value` of config key `key` must lie in the given (half-)open range."""
  too_low = low is not None and (value <= low if low_open else value < low)
  too_high = high is not None and (value >= high if high_open else value > high)
  if too_low or too_high:
    lo = '' if low is None else f"{'>' if low_open else '>='} {low}"
    hi = '' if high is None else f"{'<' if high_open else '<='} {high}"
    allowed = ' and '.join(s for s in (lo, hi) if s)
    raise UserError(f'config.{key}={value!r} is out of range: it must be {allowed}')


def model_class_and_kwargs(model_config):
  """The model class `model_config.name` names and its keyword arguments.

  Raises UserError for an unknown name, an argument the class does not take,
  or an argument it needs that the config lacks.
  """
  check_choice('model.name', model_config.name, sorted(MODELS))
  cls = MODELS[model_config.name]
  kwargs = {k: v for k, v in model_config.items() if k != 'name'}
  fields = {f.name: f for f in dataclasses.fields(cls)
            if f.name not in ('parent', 'name')}
  for key in kwargs:
    if key not in fields:
      raise UserError(
          f"config.model.{key} is not an argument of model '{model_config.name}'"
          f"{_suggest(key, fields)}; it takes: {', '.join(sorted(fields))}")
  for key, field in fields.items():
    no_default = (field.default is dataclasses.MISSING
                  and field.default_factory is dataclasses.MISSING)
    if no_default and key not in kwargs:
      raise UserError(f"config.model.{key} is required by model "
                      f"'{model_config.name}'; set it in the config")
  return cls, kwargs


def _check_divisible(key: str, value: int, by: int, what: str) -> None:
  if value % by:
    raise UserError(f'config.{key}={value} does not divide by the {what} ({by}); '
                    f'use a multiple of {by}')


def validate(config) -> None:
  """Raises UserError at the first invalid value in `config`."""
  check_range('seed', config.seed, low=0)
  check_range('num_seeds', config.num_seeds, low=1)
  for key in ('param_dtype', 'compute_dtype'):
    check_choice(f'precision.{key}', config.precision[key],
                 sorted(precision.DTYPES))
  check_choice('task', config.task, tasks.TASKS)
  # Model.
  model_class_and_kwargs(config.model)
  if 'dropout_rate' in config.model:
    check_range('model.dropout_rate', config.model.dropout_rate,
                low=0.0, high=1.0, high_open=True)
  if 'attention_kernel' in config.model:
    check_choice('model.attention_kernel', config.model.attention_kernel,
                 attention.KERNELS)
  if 'remat' in config.model:
    check_choice('model.remat', config.model.remat, transformer.REMAT)
  if 'scan_unroll' in config.model:
    check_range('model.scan_unroll', config.model.scan_unroll, low=1)
  if (config.model.get('attention_kernel') == 'cudnn'
      and jax.default_backend() != 'gpu'):
    raise UserError(
        "config.model.attention_kernel='cudnn' needs a GPU, but JAX runs on "
        f"{jax.default_backend()}; use 'xla', 'einsum', 'chunked' or 'blocked'")
  # Loss.
  check_choice('loss.name', config.loss.name, sorted(losses.LOSSES))
  check_range('loss.label_smoothing', config.loss.label_smoothing,
              low=0.0, high=1.0, high_open=True)
  check_range('loss.l1', config.loss.l1, low=0.0)
  check_range('loss.l2', config.loss.l2, low=0.0)
  # Optimiser.
  opt = config.optimizer
  check_choice('optimizer.name', opt.name, optimizers.OPTIMIZERS)
  check_choice('optimizer.schedule', opt.schedule, optimizers.SCHEDULES)
  check_range('optimizer.learning_rate', opt.learning_rate, low=0.0, low_open=True)
  check_range('optimizer.warmup_steps', opt.warmup_steps, low=0)
  check_range('optimizer.final_lr_fraction', opt.final_lr_fraction,
              low=0.0, high=1.0)
  check_range('optimizer.momentum', opt.momentum, low=0.0, high=1.0,
              high_open=True)
  check_range('optimizer.b1', opt.b1, low=0.0, high=1.0, high_open=True)
  check_range('optimizer.b2', opt.b2, low=0.0, high=1.0, high_open=True)
  check_range('optimizer.eps', opt.eps, low=0.0)
  check_range('optimizer.weight_decay', opt.weight_decay, low=0.0)
  check_range('optimizer.grad_clip_norm', opt.grad_clip_norm, low=0.0)
  # Loop lengths and intervals.
  check_range('batch_size', config.batch_size, low=1)
  check_range('eval_batch_size', config.eval_batch_size, low=1)
  # Devices: the mesh fits the devices, the rules name real axes, and both
  # batch sizes split evenly over the batch shards.
  check_choice('sharding_preset', config.sharding_preset,
               tuple(sharding.PRESETS))
  sizes = sharding.mesh_shape(config.mesh, jax.device_count())
  shards = math.prod(
      sizes[a] for a in sharding.batch_axes(sharding.rules_from_config(config)))
  _check_divisible('batch_size', config.batch_size, shards,
                   'number of batch shards')
  _check_divisible('eval_batch_size', config.eval_batch_size, shards,
                   'number of batch shards')
  if config.num_train_steps <= 0 and config.num_epochs <= 0:
    raise UserError(f'config.num_train_steps={config.num_train_steps} and '
                    f'config.num_epochs={config.num_epochs}: set one of them > 0')
  check_range('eval_every_steps', config.eval_every_steps, low=1)
  check_range('log_every_steps', config.log_every_steps, low=1)
  check_range('checkpoint.save_every_steps', config.checkpoint.save_every_steps,
              low=1)
  check_range('checkpoint.keep_latest', config.checkpoint.keep_latest, low=1)
  check_range('checkpoint.keep_best', config.checkpoint.keep_best, low=0)
  check_range('nonfinite.max_consecutive', config.nonfinite.max_consecutive,
              low=1)
  # Data.
  check_range('data.augment.crop_padding', config.data.augment.crop_padding,
              low=0)
  check_range('data.prefetch_threads', config.data.prefetch_threads, low=0)
  check_range('data.prefetch_batches', config.data.prefetch_batches, low=1)
  if len(config.data.mean) != len(config.data.std):
    raise UserError(f'config.data.mean has {len(config.data.mean)} values but '
                    f'config.data.std has {len(config.data.std)}; give both the '
                    'same number (1, or one per channel)')
  for s in config.data.std:
    check_range('data.std', s, low=0.0, low_open=True)



# Keys a resumed run may change freely: where arrays live, what a layer
# keeps for its backward pass and how the depth loop is unrolled (the same
# values up to rounding), how often things are logged, evaluated or saved,
# and what is drawn. Everything else changes what is computed (model, data,
# loss, optimiser and schedule, seed, steps).
_LAYOUT_AND_OUTPUT_KEYS = (
    'mesh.', 'sharding_preset', 'sharding_rules', 'model.remat',
    'model.scan_unroll', 'eval_every_steps',
    'log_every_steps', 'checkpoint.', 'write_plots', 'progress_bar',
    'eval_batch_size', 'data.tfds_data_dir', 'data.prefetch_',
    'nonfinite.max_consecutive', 'samples.')


# Keys added after runs were already being saved, with the value that means
# what a run from before them did: a saved config without the key resumes
# under that value as unchanged.
_ADDED_KEYS = {'num_seeds': 1, 'data.synthetic.zero_pad': False,
               'precision.param_dtype': 'float32',
               'precision.compute_dtype': 'float32'}


def _flatten(tree, prefix='') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def computation_changes(saved: dict, requested: dict) -> list[str]:
  """Dotted keys whose values differ in ways that change the computation.

  Args:
    saved, requested: configs as JSON-decoded dicts (tuples become lists in
      both, so they compare equal).

  Returns:
    'key: saved -> requested' strings, sorted; empty if the run may resume.
  """
  saved, requested = _flatten(saved), _flatten(requested)
  changes = []
  for key in sorted(set(saved) | set(requested)):
    if key.startswith(_LAYOUT_AND_OUTPUT_KEYS):
      continue
    before = saved.get(key, _ADDED_KEYS.get(key, '<absent>'))
    after = requested.get(key, '<absent>')
    if before != after:
      changes.append(f'{key}: {before!r} -> {after!r}')
  return changes
