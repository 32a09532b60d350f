"""Bad input through the real entry point: one line, non-zero exit, workdir intact."""

import hashlib
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFIG = 'configs/cnn_fashion_mnist.py:smoke'


def run_train(*args, env=None):
  return subprocess.run(
      [sys.executable, '-m', 'experiments.train', *args],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, **(env or {})})


def snapshot(directory):
  """{relative path: sha256} of every file below `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def finished_workdir(fake_data_dir, tmp_path_factory):
  """A workdir holding a finished smoke run (checkpoints, metrics, pictures)."""
  workdir = str(tmp_path_factory.mktemp('cli') / 'run')
  result = run_train(f'--config={CONFIG}', f'--workdir={workdir}',
                     f'--config.data.tfds_data_dir={fake_data_dir}')
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.mark.parametrize('override, env, expected', [
    ('--config.optimizer.learning_rat=0.1', {},
     "unknown config key 'optimizer.learning_rat' in "
     "--config.optimizer.learning_rat=0.1; did you mean 'optimizer.learning_rate'?"),
    ('--config.batch_size=abc', {}, 'batch_size'),
    ('--config.optimizer.learning_rate=-0.1', {},
     'config.optimizer.learning_rate=-0.1 is out of range: it must be > 0.0'),
    ('--config.optimizer.name=adm', {},
     "config.optimizer.name='adm' is not one of 'sgd', 'adam', 'adamw' "
     "(did you mean 'adam'?)"),
    ('--config.batch_size=33',
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
     'config.batch_size=33 does not divide by the number of batch shards (2); '
     'use a multiple of 2'),
    ('--config.mesh.tensor=3',
     {'XLA_FLAGS': '--xla_force_host_platform_device_count=2'},
     'config.mesh (data=-1, fsdp=1, tensor=3) needs a multiple of 3 devices '
     'but there are 2; change the fixed sizes'),
    ('--config.model.dropout=0.5', {},
     "unknown config key 'model.dropout' in --config.model.dropout=0.5; "
     "did you mean 'model.dropout_rate'?"),
])
def test_bad_input_is_one_line_and_leaves_workdir(
    finished_workdir, fake_data_dir, override, env, expected):
  before = snapshot(finished_workdir)
  result = run_train(f'--config={CONFIG}', f'--workdir={finished_workdir}',
                     f'--config.data.tfds_data_dir={fake_data_dir}', override,
                     env=env)
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert expected in lines[0]
  assert snapshot(finished_workdir) == before


def test_missing_data_names_the_command(tmp_path):
  workdir = tmp_path / 'run'
  empty = tmp_path / 'no_data'
  result = run_train(f'--config={CONFIG}', f'--workdir={workdir}',
                     f'--config.data.tfds_data_dir={empty}')
  assert result.returncode == 2, result.stderr[-3000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1, result.stderr
  assert ('python -m experiments.prepare_data --dataset=fashion_mnist_local '
          f'--data_dir={empty}') in lines[0]
  assert not workdir.exists()


def test_missing_config_file():
  result = run_train('--config=configs/nope.py', '--workdir=/tmp/unused')
  assert result.returncode == 2
  assert len(result.stderr.strip().splitlines()) == 1
  assert 'configs/nope.py' in result.stderr
