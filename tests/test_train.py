"""The real training function, tiny, on the fake dataset."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from bigjax import metric_writers
from bigjax import train
from configs import cnn_fashion_mnist


def smoke_config(data_dir, **overrides):
  config = cnn_fashion_mnist.get_config('smoke')
  config.data.tfds_data_dir = data_dir
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def restored_params(workdir, step):
  """The params saved at `step`, as NumPy, read back without a target."""
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as m:
    restored = m.restore(step)
  return jax.tree.map(np.asarray, restored['state']['params'])


def test_smoke_trains_and_writes_outputs(fake_data_dir, tmp_path):
  workdir = str(tmp_path / 'run')
  final = train.train_and_evaluate(smoke_config(fake_data_dir), workdir)

  history = metric_writers.read_history(workdir)
  losses = [r['train/loss'] for r in history if 'train/loss' in r]
  assert len(losses) == 4  # log_every_steps=10 over 40 steps.
  assert losses[-1] < 0.5 * losses[0], losses
  # The fake classes are easy: a working model separates them.
  assert final['eval/accuracy'] > 0.9, final
  assert final['eval/num_examples'] == 200

  for name in ('config.json', 'metrics.jsonl', 'final_metrics.json',
               'pictures/curves.png', 'pictures/predictions.png',
               'pictures/confusion_matrix.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  assert any(f.startswith('events.out.tfevents')
             for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  with open(os.path.join(workdir, 'config.json')) as f:
    assert json.load(f)['model']['features'] == [32, 64]
  # Checkpoints after each eval (steps 20, 40): latest and best are kept.
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as m:
    assert m.all_steps() == [20, 40]


class _Interrupted(Exception):
  pass


def test_resume_continues_bitwise(fake_data_dir, tmp_path, monkeypatch):
  """A run that dies after step 25 and is restarted ends as if never stopped."""
  config = smoke_config(fake_data_dir, write_plots=False)
  straight = str(tmp_path / 'straight')
  train.train_and_evaluate(config, straight)

  from bigjax.data import input_pipeline
  real_batches = input_pipeline.train_batches
  starts = []

  def dying_batches(*args, start_step, **kwargs):
    starts.append(start_step)
    batches = real_batches(*args, start_step=start_step, **kwargs)
    for step, batch in enumerate(batches, start=start_step + 1):
      if step == 26 and len(starts) == 1:
        raise _Interrupted()
      yield batch

  monkeypatch.setattr(input_pipeline, 'train_batches', dying_batches)
  resumed = str(tmp_path / 'resumed')
  with pytest.raises(_Interrupted):
    train.train_and_evaluate(config, resumed)
  train.train_and_evaluate(config, resumed)

  assert starts == [0, 20]  # The second run resumed from the step-20 save.
  want, got = restored_params(straight, 40), restored_params(resumed, 40)
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_rerun_of_finished_run_changes_nothing(fake_data_dir, tmp_path):
  config = smoke_config(fake_data_dir, write_plots=False)
  workdir = str(tmp_path / 'run')
  first = train.train_and_evaluate(config, workdir)
  before = restored_params(workdir, 40)
  again = train.train_and_evaluate(config, workdir)
  assert again['eval/accuracy'] == first['eval/accuracy']
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 40),
               before)


def test_state_params_are_unboxed_so_penalties_reach_every_kernel():
  """ViT's params carry logical-axis boxes; the state must hold plain arrays,
  or L1/L2 and AdamW's decay mask would silently skip the boxed weights."""
  import optax
  from bigjax import losses
  from bigjax.models import transformer
  model = transformer.ViT(num_classes=10, patch_size=7, d_model=16,
                          num_layers=2, num_heads=2, mlp_dim=32)
  from bigjax import tasks
  from bigjax.data import input_pipeline
  info = input_pipeline.DatasetInfo(10, tuple('abcdefghij'), (28, 28, 1), 1, 1)
  task = tasks.Classification(None, info, losses.cross_entropy)
  state = train.create_train_state(jax.random.PRNGKey(0), model=model,
                                   tx=optax.adam(1e-3), task=task)
  leaves = jax.tree_util.tree_leaves_with_path(state.params)
  assert all(isinstance(x, jax.Array) for _, x in leaves)
  penalised = [jax.tree_util.keystr(p) for p, _ in leaves if losses.is_penalised(p)]
  kernels = [jax.tree_util.keystr(p) for p, _ in leaves
             if jax.tree_util.keystr(p).endswith(("['kernel']", "['embedding']"))]
  assert penalised == kernels
  assert any('query' in p for p in penalised), penalised
