"""Seeds trained together (`config.num_seeds`): one vmapped program, the same
results as separate runs."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax import metric_writers
from bigjax import train
from tests.test_train import smoke_config

SEEDS = (3, 4, 5)


def _final(path):
  with open(os.path.join(path, train.FINAL_METRICS_FILE)) as f:
    return json.load(f)


def _last_params(workdir):
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as m:
    restored = m.restore(m.latest_step())
  return jax.tree.map(np.asarray, restored['state']['params'])


@pytest.fixture(scope='module')
def separate_and_stacked(fake_data_dir, tmp_path_factory):
  """Three ordinary runs, and the same seeds trained together, 20 steps of
  the CNN with dropout and random flips (so init, dropout and data order all
  depend on the seed)."""
  root = tmp_path_factory.mktemp('seeds')
  overrides = {'write_plots': False, 'num_train_steps': 20,
               'eval_every_steps': 20, 'checkpoint.save_every_steps': 10}
  separate = {}
  for seed in SEEDS:
    path = str(root / f'alone_{seed}')
    train.train_and_evaluate(
        smoke_config(fake_data_dir, seed=seed, **overrides), path)
    separate[seed] = path
  stacked = str(root / 'stacked')
  mean = train.train_and_evaluate(
      smoke_config(fake_data_dir, seed=SEEDS[0], num_seeds=len(SEEDS),
                   **overrides), stacked)
  return separate, stacked, mean


def test_stacked_seeds_match_separate_runs(separate_and_stacked):
  separate, stacked, mean = separate_and_stacked
  finals = []
  for k, seed in enumerate(SEEDS):
    want = _final(separate[seed])
    got = _final(os.path.join(stacked, f'seed_{seed}'))
    assert got.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6,
                                 err_msg=f'seed {seed}: {key}')
    finals.append(want)
    # The parameters themselves, not just the metrics. Absolute tolerance
    # 1e-5 (weights here are ~1e-2): batched kernels sum in another order,
    # and Adam divides by sqrt(v), so an element whose gradient is almost
    # zero moves by rounding noise times the learning rate (seen: 2.4e-6
    # on one element of 401,408).
    stacked_params = jax.tree.map(lambda x, k=k: x[k], _last_params(stacked))
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-5,
                                                         atol=1e-5),
                 stacked_params, _last_params(separate[seed]))
  # The seeds really differ, and the run's own metrics are their means.
  losses = [f['eval/loss'] for f in finals]
  assert len(set(losses)) == len(SEEDS), losses
  np.testing.assert_allclose(mean['eval/loss'], np.mean(losses), rtol=1e-5)
  assert _final(stacked) == pytest.approx(mean)


def test_stacked_seeds_write_per_seed_histories(separate_and_stacked):
  separate, stacked, _ = separate_and_stacked
  for seed in SEEDS:
    got = metric_writers.read_history(os.path.join(stacked, f'seed_{seed}'))
    want = metric_writers.read_history(separate[seed])
    assert [r['step'] for r in got] == [r['step'] for r in want]
    np.testing.assert_allclose(
        [r['train/loss'] for r in got if 'train/loss' in r],
        [r['train/loss'] for r in want if 'train/loss' in r], rtol=1e-5)
  run = metric_writers.read_history(stacked)
  assert run[-1]['train/examples_per_sec'] > 0
  with open(os.path.join(stacked, 'sharding.txt')) as f:
    assert f'train together: the state holds {len(SEEDS)} copies' in f.read()


def test_stacked_seeds_resume_bitwise(fake_data_dir, separate_and_stacked,
                                      tmp_path, monkeypatch):
  """Stopped after step 15 and rerun, the stacked run ends bit-identical."""
  _, stacked, _ = separate_and_stacked
  from bigjax.data import input_pipeline
  real_batches = input_pipeline.train_batches
  calls = []

  class Interrupted(Exception):
    pass

  def dying_batches(*args, start_step, **kwargs):
    calls.append(start_step)
    for step, batch in enumerate(real_batches(*args, start_step=start_step,
                                              **kwargs), start=start_step + 1):
      if step == 16 and len(calls) <= len(SEEDS):
        raise Interrupted()
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', dying_batches)
  config = smoke_config(fake_data_dir, seed=SEEDS[0], num_seeds=len(SEEDS),
                        write_plots=False, num_train_steps=20,
                        eval_every_steps=20, **{
                            'checkpoint.save_every_steps': 10})
  resumed = str(tmp_path / 'resumed')
  with pytest.raises(Interrupted):
    train.train_and_evaluate(config, resumed)
  train.train_and_evaluate(config, resumed)
  # One stream per seed, from step 0 and then from the step-10 checkpoint.
  assert calls == [0] * len(SEEDS) + [10] * len(SEEDS)
  jax.tree.map(np.testing.assert_array_equal, _last_params(resumed),
               _last_params(stacked))
