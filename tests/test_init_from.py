"""Fine-tuning: parameters from another run, frozen groups, clear errors."""

import jax
import numpy as np
import pytest

from bigjax import train
from bigjax.errors import UserError
from tests.test_train import restored_params
from tests.test_train import smoke_config


@pytest.fixture(scope='module')
def pretrained(fake_data_dir, tmp_path_factory):
  """A finished smoke CNN run (40 steps) to start from."""
  workdir = str(tmp_path_factory.mktemp('pretrained') / 'run')
  train.train_and_evaluate(smoke_config(fake_data_dir, write_plots=False),
                           workdir)
  return workdir


def _start(config, workdir):
  """The state a run in `workdir` starts from (nothing trained)."""
  _, state, _ = train.load_state(config, workdir, init_from=config.init_from)
  return jax.device_get(state)


def test_matching_parameters_come_from_the_run_the_rest_fresh(
    pretrained, fake_data_dir, tmp_path):
  config = smoke_config(fake_data_dir, seed=7)
  fresh = _start(config, str(tmp_path / 'fresh'))
  config.init_from.workdir = pretrained
  config.init_from.params = ('conv.*',)
  start = _start(config, str(tmp_path / 'tuned'))
  source = restored_params(pretrained, 40)
  for name in ('conv0', 'conv1'):
    jax.tree.map(np.testing.assert_array_equal, start.params[name],
                 source[name])
  for name in ('hidden', 'head'):
    jax.tree.map(np.testing.assert_array_equal, start.params[name],
                 fresh.params[name])
    assert not np.array_equal(start.params[name]['kernel'],
                              source[name]['kernel'])
  # The optimizer state is fresh: Adam's moments are zero, its count 0.
  assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))
  assert start.step == 0


def test_frozen_parameters_stay_as_loaded(pretrained, fake_data_dir,
                                          tmp_path):
  config = smoke_config(fake_data_dir, write_plots=False, num_train_steps=10)
  config.init_from.workdir = pretrained
  config.optimizer.frozen = ('conv.*',)
  train.train_and_evaluate(config, str(tmp_path))
  tuned, source = restored_params(str(tmp_path), 10), restored_params(
      pretrained, 40)
  jax.tree.map(np.testing.assert_array_equal, tuned['conv1'], source['conv1'])
  assert not np.array_equal(tuned['head']['kernel'], source['head']['kernel'])


def test_resuming_beats_init_from(pretrained, fake_data_dir, tmp_path):
  """A run with checkpoints of its own resumes them, ignoring init_from."""
  config = smoke_config(fake_data_dir, write_plots=False, num_train_steps=4)
  train.train_and_evaluate(config, str(tmp_path))
  config.init_from.workdir = pretrained
  state = _start(config, str(tmp_path))
  assert state.step == 4
  jax.tree.map(np.testing.assert_array_equal, state.params,
               restored_params(str(tmp_path), 4))


@pytest.mark.parametrize('overrides, message', [
    ({'init_from.params': ('convv.*',)}, "pattern 'convv.*' matches no "
     'parameter'),
    ({'model.dense_features': 64}, 'head/kernel is float32[128, 10] in '
     'the checkpoint but float32[64, 10] in this model'),
    ({'init_from.workdir': '/nonexistent'}, 'has no checkpoints'),
])
def test_bad_init_from_is_a_one_line_error(pretrained, fake_data_dir,
                                           tmp_path, overrides, message):
  config = smoke_config(fake_data_dir)
  config.init_from.workdir = pretrained
  for key, value in overrides.items():
    node, leaf = key.split('.')
    config[node][leaf] = value
  with pytest.raises(UserError) as e:
    _start(config, str(tmp_path))
  assert message in str(e.value) and '\n' not in str(e.value)
