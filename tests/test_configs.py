"""Every config in configs/ builds and validates; the checks reject bad values."""

import glob
import importlib
import json
import os

import jax
import pytest

from bigjax import config_validation
from bigjax.errors import UserError
from configs import base
from tests.conftest import ROOT

CONFIG_MODULES = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if not p.endswith('__init__.py'))


def _variants(module):
  """None plus each variant the config's docstring names (`:smoke`)."""
  return [None] + (['smoke'] if ':smoke' in (module.__doc__ or '') else [])


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_config_builds_and_validates(name):
  module = importlib.import_module(f'configs.{name}')
  for arg in _variants(module):
    config = module.get_config(arg)
    config_validation.validate(config)


@pytest.mark.parametrize('name', CONFIG_MODULES)
def test_config_declares_no_key_beyond_base(name):
  """Experiment configs set values; only the base declares keys (model aside)."""
  base_config = base.get_config()

  def keys(c, prefix=''):
    out = set()
    for k, v in c.items():
      if prefix + k == 'model':
        continue
      out.add(prefix + k)
      if hasattr(v, 'items'):
        out |= keys(v, f'{prefix}{k}.')
    return out

  config = importlib.import_module(f'configs.{name}').get_config()
  assert keys(config) <= keys(base_config)


@pytest.mark.parametrize('key, value, message', [
    ('loss.name', 'hinge', "config.loss.name='hinge' is not one of"),
    ('optimizer.schedule', 'warmup_cosin', "(did you mean 'warmup_cosine'?)"),
    ('optimizer.momentum', 1.0, 'config.optimizer.momentum=1.0 is out of range'),
    ('model.dropout_rate', 1.0, 'must be >= 0.0 and < 1.0'),
    ('num_epochs', 0.0, 'set one of them > 0'),
    ('model.name', 'resnt', "config.model.name='resnt' is not one of"),
    ('data.std', (0.0,), 'config.data.std=0.0 is out of range'),
    ('model.remat', 'ful', "config.model.remat='ful' is not one of"),
    ('model.scan_unroll', 0, 'config.model.scan_unroll=0 is out of range'),
    ('model.attention_kernel', 'flash',
     "config.model.attention_kernel='flash' is not one of"),
])
def test_invalid_values_are_rejected(key, value, message):
  name = ('transformer_shakespeare' if key.startswith(
      ('model.remat', 'model.scan', 'model.attention')) else 'cnn_fashion_mnist')
  config = importlib.import_module(f'configs.{name}').get_config()
  if key == 'num_epochs':
    config.num_train_steps = -1
  *parents, leaf = key.split('.')
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(UserError) as e:
    config_validation.validate(config)
  assert message in str(e.value)
  assert '\n' not in str(e.value)


@pytest.mark.skipif(jax.default_backend() == 'gpu', reason='cuDNN is there')
def test_cudnn_attention_without_a_gpu_is_one_line():
  config = importlib.import_module('configs.transformer_shakespeare').get_config()
  config.model.attention_kernel = 'cudnn'
  with pytest.raises(UserError) as e:
    config_validation.validate(config)
  assert "attention_kernel='cudnn' needs a GPU" in str(e.value)
  assert '\n' not in str(e.value)


def test_unknown_model_argument_is_named():
  config = importlib.import_module('configs.cnn_fashion_mnist').get_config()
  with config.unlocked():
    config.model.num_layers = 3
  with pytest.raises(UserError, match='config.model.num_layers is not an argument'):
    config_validation.validate(config)


def test_speed_keys_may_change_on_resume():
  """remat and scan_unroll change speed and memory, not values: a resumed
  run may change them; the attention kernel (rounding, weights, dropout)
  may not be switched silently."""
  config = importlib.import_module('configs.transformer_shakespeare').get_config()
  saved = json.loads(config.to_json_best_effort())
  config.model.remat = 'full'
  config.model.scan_unroll = 2
  assert config_validation.computation_changes(
      saved, json.loads(config.to_json_best_effort())) == []
  config.model.attention_kernel = 'einsum'
  assert config_validation.computation_changes(
      saved, json.loads(config.to_json_best_effort())) == [
          "model.attention_kernel: 'blocked' -> 'einsum'"]
