"""Runs that survive: kills, preemption, NaNs and config drift.

The kill and SIGTERM tests run the real entry point as an OS process and end
with parameters bit-identical to an uninterrupted run of the same config.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from bigjax import metric_writers
from bigjax import train
from bigjax.errors import UserError
from tests.conftest import ROOT
from tests.test_train import restored_params
from tests.test_train import smoke_config

CONFIG = 'configs/cnn_fashion_mnist.py:smoke'
# 40 steps, a checkpoint every 4, metrics every step (to see progress).
FLAGS = ('--config.checkpoint.save_every_steps=4', '--config.log_every_steps=1',
         '--config.write_plots=False', '--config.checkpoint.keep_latest=2')


def _start(workdir, data_dir):
  return subprocess.Popen(
      [sys.executable, '-m', 'experiments.train', f'--config={CONFIG}',
       f'--workdir={workdir}', f'--config.data.tfds_data_dir={data_dir}',
       *FLAGS],
      cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _logged_step(workdir) -> int:
  history = metric_writers.read_history(str(workdir))
  return max((r['step'] for r in history if 'train/loss' in r), default=0)


def _wait_for_step(proc, workdir, step, timeout=240):
  """Waits until the run has logged `step` (or has ended)."""
  deadline = time.time() + timeout
  while _logged_step(workdir) < step and proc.poll() is None:
    assert time.time() < deadline, 'the run made no progress'
    time.sleep(0.05)


@pytest.fixture(scope='module')
def straight_run(fake_data_dir, tmp_path_factory):
  """An uninterrupted run of the same command."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  proc = _start(workdir, fake_data_dir)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return restored_params(str(workdir), 40)


def test_sigkill_at_random_steps_resumes_bitwise(straight_run, fake_data_dir,
                                                 tmp_path):
  """SIGKILL three times at random steps; each rerun resumes; the end is the
  same, bit for bit, as a run never stopped."""
  workdir = tmp_path / 'killed'
  rng = random.Random(0)
  kill_steps = sorted(rng.sample(range(3, 38), 3))
  for kill_step in kill_steps:
    proc = _start(workdir, fake_data_dir)
    _wait_for_step(proc, workdir, kill_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  proc = _start(workdir, fake_data_dir)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  jax.tree.map(np.testing.assert_array_equal,
               restored_params(str(workdir), 40), straight_run)


def test_sigterm_saves_and_exits_cleanly(straight_run, fake_data_dir,
                                         tmp_path):
  workdir = tmp_path / 'preempted'
  proc = _start(workdir, fake_data_dir)
  _wait_for_step(proc, workdir, 10)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert 'SIGTERM: saved step' in err
  steps = sorted(int(d) for d in os.listdir(workdir / 'checkpoints')
                 if d.isdigit())
  stopped_at = _logged_step(workdir)
  assert steps[-1] == stopped_at < 40  # Saved where it stopped, mid-interval
  assert not os.path.exists(workdir / 'final_metrics.json')
  proc = _start(workdir, fake_data_dir)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  jax.tree.map(np.testing.assert_array_equal,
               restored_params(str(workdir), 40), straight_run)


# ---- Non-finite guard ----------------------------------------------------------


def _one_step(fake_data_dir, nan_at_steps):
  """(state before, state after) one train step of the smoke CNN."""
  config = smoke_config(fake_data_dir)
  config.optimizer.warmup_steps = 0  # So the first step moves the weights.
  config.nonfinite.inject_nan_at_steps = nan_at_steps
  exp = train.build_experiment(config)
  state = jax.jit(exp.init_state)(jax.random.PRNGKey(0))
  batch = next(exp.task.train_batches(global_batch_size=32, seed=0,
                                      start_step=0))
  step = jax.jit(exp.train_step)
  before = jax.device_get(state)
  after, metrics = step(state, batch)
  return before, jax.device_get(after), jax.device_get(metrics)


def test_nonfinite_step_leaves_the_state_bitwise_untouched(fake_data_dir):
  before, after, metrics = _one_step(fake_data_dir, nan_at_steps=(1,))
  assert np.isnan(metrics['train/loss']) and metrics['train/skipped'] == 1.0
  for name in ('params', 'opt_state', 'model_state', 'rng'):
    jax.tree.map(np.testing.assert_array_equal, getattr(after, name),
                 getattr(before, name))
  assert after.step == 1 and after.nonfinite_streak == 1
  # Without the injection the same step does change the parameters.
  _, good, metrics = _one_step(fake_data_dir, nan_at_steps=(2,))
  assert metrics['train/skipped'] == 0.0 and good.nonfinite_streak == 0
  assert not np.array_equal(good.params['head']['kernel'],
                            before.params['head']['kernel'])


def test_injected_nan_is_skipped_and_training_goes_on(fake_data_dir, tmp_path):
  config = smoke_config(fake_data_dir, write_plots=False, log_every_steps=1)
  config.nonfinite.inject_nan_at_steps = (7, 8)
  final = train.train_and_evaluate(config, str(tmp_path))
  history = metric_writers.read_history(str(tmp_path))
  skipped = [r['step'] for r in history if r.get('train/skipped')]
  assert skipped == [7, 8]
  assert final['eval/accuracy'] > 0.9
  params = restored_params(str(tmp_path), 40)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_consecutive_nans_stop_the_run_with_good_checkpoints(fake_data_dir,
                                                             tmp_path):
  config = smoke_config(fake_data_dir, write_plots=False, log_every_steps=1)
  config.checkpoint.save_every_steps = 2
  config.nonfinite.max_consecutive = 3
  config.nonfinite.inject_nan_at_steps = (9, 10, 11, 12)
  with pytest.raises(UserError, match='stopped at step 11: the last 3 steps '
                     'had a non-finite loss') as e:
    train.train_and_evaluate(config, str(tmp_path))
  assert 'newest checkpoint (step 10)' in str(e.value)
  for step in (8, 10):
    params = restored_params(str(tmp_path), step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# ---- Config drift --------------------------------------------------------------


def test_resuming_under_another_config_is_refused(fake_data_dir, tmp_path):
  workdir = str(tmp_path)
  config = smoke_config(fake_data_dir, write_plots=False)
  config.num_train_steps = 4
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    first = f.read()

  changed = smoke_config(fake_data_dir, write_plots=False)
  changed.num_train_steps = 4
  changed.optimizer.learning_rate = 0.1
  changed.seed = 3
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(changed, workdir)
  message = str(e.value)
  assert 'optimizer.learning_rate: 0.002 -> 0.1' in message
  assert 'seed: 0 -> 3' in message and '--allow_config_change' in message
  assert '\n' not in message
  with open(os.path.join(workdir, 'config.json')) as f:
    assert f.read() == first  # Nothing was touched.

  # Layout and output keys may change freely.
  relaid = smoke_config(fake_data_dir, write_plots=True)
  relaid.num_train_steps = 4
  relaid.eval_every_steps = 2
  relaid.mesh.data = 1
  train.train_and_evaluate(relaid, workdir)

  train.train_and_evaluate(changed, workdir, allow_config_change=True)
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['optimizer']['learning_rate'] == 0.1
  with open(os.path.join(workdir, 'config.previous.json')) as f:
    assert f.read() == first
