"""The ablation driver: cells, budgets, one-line errors, reports, reruns.

Cells are variants of a tiny seq2seq model on generated data (no dataset
files). Most driver tests replace the trainer with a stand-in that writes
known final metrics, so they check the bookkeeping in milliseconds; one runs
a real tiny ablation end to end (a tiny CNN on the fake images).
"""

import copy
import glob
import importlib
import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from scipy import stats as scipy_stats

from bigjax import ablation
from bigjax import config_files
from bigjax import stats
from bigjax import train
from bigjax.errors import UserError
from configs.ablations import base
from tests.conftest import ROOT

# A seq2seq model small enough to compile in seconds; generated data.
_TINY = {
    'model.d_model': 16, 'model.num_layers': 1, 'model.num_heads': 2,
    'model.mlp_dim': 32, 'model.max_len': 16,
    'data.synthetic.max_length': 4, 'data.synthetic.num_eval_examples': 64,
    'batch_size': 8, 'eval_batch_size': 64, 'eval_every_steps': 1000,
    'log_every_steps': 1000, 'checkpoint.save_every_steps': 1000,
    'optimizer.warmup_steps': 0, 'write_plots': False, 'progress_bar': False,
}


def tiny_ablation(**changes):
  """Two cells (mlp_dim 32 vs 64) x 2 seeds of the tiny seq2seq model;
  `changes` sets ablation keys ('budget.value': 5.0)."""
  c = base.get_config()
  c.base_config = os.path.join(ROOT, 'configs/transformer_seq2seq.py:copy')
  c.axes = (base.axis('mlp', {'model.mlp_dim': (32, 64)},
                      labels=('narrow', 'wide')),)
  c.num_seeds = 2
  c.budget.value = 3.0
  c.metrics = (('eval/exact_match', 'higher'), ('eval/loss', 'lower'))
  for key, value in changes.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  if 'overrides' not in changes:  # The tiny model, but what the axes vary.
    varied = {k for a in c.axes for k in a['keys']}
    c.overrides = base.nested({k: v for k, v in _TINY.items()
                               if k not in varied})
  return c


# ---- Cells -------------------------------------------------------------------


def test_cells_zip_within_an_axis_and_cross_between_axes():
  c = tiny_ablation(axes=(
      base.axis('shape', {'model.num_heads': (1, 2, 4),
                          'model.d_model': (8, 16, 32)},
                labels=('h1', 'h2', 'h4')),
      base.axis('ffn', {'model.mlp_dim': (32, 64)}),
  ))
  cells = ablation.expand_cells(c)
  assert [name for name, _, _ in cells] == [
      'shape-h1__ffn-32', 'shape-h1__ffn-64', 'shape-h2__ffn-32',
      'shape-h2__ffn-64', 'shape-h4__ffn-32', 'shape-h4__ffn-64']
  name, labels, settings = cells[3]
  assert labels == {'shape': 'h2', 'ffn': '64'}
  assert settings == {'model.num_heads': 2, 'model.d_model': 16,
                      'model.mlp_dim': 64}


def test_derived_labels_are_safe_folder_names():
  c = tiny_ablation(axes=(
      base.axis('conv', {'model.features': ((16, 32), (8, 8))}),
      base.axis('src', {'base_config': ('configs/a b.py', 'configs/c.py')}),
  ))
  names = [name for name, _, _ in ablation.expand_cells(c)]
  assert names[0] == 'conv-16x32__src-configs_a_b.py'
  assert all(os.path.basename(n) == n and ' ' not in n for n in names)


def test_cells_apply_overrides_then_axes(tmp_path):
  cells = ablation.plan(tiny_ablation())
  assert [c.name for c in cells] == ['mlp-narrow', 'mlp-wide']
  wide = cells[1].config
  assert (wide.model.mlp_dim, wide.model.d_model,
          wide.batch_size) == (64, 16, 8)
  assert wide.num_train_steps == 3 and wide.seed == 0
  # Parameter counts from shapes: the wider feed-forward adds 2 x 16 x 32
  # weights and 32 biases in each of the encoder and decoder layers.
  assert (cells[1].parameters['unique'] - cells[0].parameters['unique']
          == 2 * (2 * 16 * 32 + 32))


# ---- Budgets -----------------------------------------------------------------


@pytest.mark.parametrize('kind, value, expected', [
    ('steps', 7.0, 7),
    ('examples', 100.0, 13),   # ceil(100 / 8)
    ('epochs', 1.5, 188),      # ceil(1.5 * 1000 / 8)
    ('flops', 1e9, 334),       # ceil(1e9 / 3e6)
    ('flops', 1.0, 1),         # never less than one step
])
def test_budget_steps(kind, value, expected):
  budget = tiny_ablation(**{'budget.kind': kind, 'budget.value': value}).budget
  assert ablation.budget_steps(budget, batch_size=8, num_train_examples=1000,
                               flops_per_step=3e6) == expected


def test_flops_count_the_matmuls_of_the_step():
  """The wider feed-forward adds exactly its matrix products: 2 x 16 x 32
  multiply-adds per token (2,048 FLOPs) forward and twice that backward,
  for the 8 x 4 source tokens (encoder) and 8 x 5 target tokens (decoder)."""
  narrow, wide = (ablation.train_step_flops(
      cell.config, train.build_experiment(cell.config))
                  for cell in ablation.plan(tiny_ablation()))
  assert wide - narrow == 3 * 2048 * (8 * 4 + 8 * 5)


def test_flops_count_every_scanned_layer():
  """Layers are one nn.scan; each must count (XLA's cost analysis would see
  the scan body once, whatever the depth)."""
  c = tiny_ablation(axes=(base.axis('depth', {'model.num_layers': (1, 2, 3)}),))
  one, two, three = (ablation.train_step_flops(
      cell.config, train.build_experiment(cell.config))
                     for cell in ablation.plan(c))
  assert two - one == three - two > 0.3 * one


# ---- Errors ------------------------------------------------------------------


@pytest.mark.parametrize('changes, message', [
    ({'axes': ()}, 'config.axes is empty'),
    ({'axes': (base.axis('a', {'model.num_heads': (1, 2),
                               'model.d_model': (8,)}),)},
     'zipped lists must be equally long'),
    ({'axes': (base.axis('a', {'model.num_heads': (1, 2)},
                         labels=('x', 'x')),)}, 'are not unique'),
    ({'axes': (base.axis('a', {'model': ({'name': 'cnn'},)}),)},
     'give it labels'),
    ({'axes': (base.axis('a', {'seed': (1, 2)}),)}, 'which the driver sets'),
    ({'baseline': 'mlp-wid'}, "did you mean 'mlp-wide'?"),
    ({'budget.kind': 'tokens'}, "config.budget.kind='tokens' is not one of"),
    ({'budget.value': 0.0}, 'config.budget.value=0.0 is out of range'),
    ({'budget.value': 2.5}, 'is not a whole number of steps'),
    ({'budget.kind': 'epochs'}, "budget.kind='epochs' needs a dataset"),
    ({'num_seeds': 0}, 'config.num_seeds=0 is out of range'),
    ({'overrides': base.nested({'num_train_steps': 5})}, 'set by the driver'),
    ({'overrides': base.nested({'model.mlp_dim': 5})}, 'also set by an axis'),
    ({'overrides': base.nested({'optimizer.learning_rat': 0.1})},
     "has no key 'optimizer.learning_rat' (did you mean "
     "'optimizer.learning_rate'?)"),
    ({'overrides': base.nested({'batch_size': 'big'})},
     'cannot set batch_size='),
    ({'overrides': base.nested({'model.num_haeds': 2})},
     "cell 'mlp-narrow': config.model.num_haeds is not an argument"),
    ({'metrics': ()}, 'config.metrics is empty'),
    ({'metrics': (('eval/loss', 'down'),)}, "is not one of 'higher', 'lower'"),
    ({'metrics': (('loss', 'lower'),)}, 'must be a (key, direction) pair'),
    ({'plot.x': 'model.d_model'}, "config.plot.x='model.d_model' is not one"),
    ({'plot.group_by': ('depth',)}, "config.plot.group_by='depth'"),
    ({'base_config': 'configs/nothing.py'},
     "config file 'configs/nothing.py' does not exist"),
])
def test_config_errors_are_one_line(changes, message):
  with pytest.raises(UserError) as e:
    ablation.plan(tiny_ablation(**changes))
  assert message in str(e.value)
  assert '\n' not in str(e.value)


# ---- Statistics --------------------------------------------------------------


def test_mean_and_ci95_against_scipy():
  values = [0.91, 0.93, 0.92, 0.95]
  mean, half = stats.mean_and_ci95(values)
  low, high = scipy_stats.t.interval(0.95, 3, loc=np.mean(values),
                                     scale=scipy_stats.sem(values))
  assert mean == pytest.approx(0.9275)
  assert half == pytest.approx((high - low) / 2)
  # By hand: sd 0.017078, sem 0.008539, t(0.975, 3) = 3.182446.
  assert half == pytest.approx(0.027175, abs=1e-6)
  assert stats.mean_and_ci95([2.0]) == (2.0, 0.0)


def test_paired_comparison_against_scipy():
  a, b = [1.0, 2.0, 3.0, 4.5], [0.5, 1.0, 2.9, 3.0]
  out = stats.paired_comparison(a, b)
  assert out['mean_difference'] == pytest.approx(0.775)
  assert out['p_value'] == pytest.approx(scipy_stats.ttest_rel(a, b).pvalue)
  assert out['ci95'] == pytest.approx(stats.mean_and_ci95(
      np.subtract(a, b))[1])
  assert out['n'] == 4
  assert math.isnan(stats.paired_comparison(a, a)['p_value'])


# ---- The driver, with a stand-in trainer -------------------------------------


class _Stop(Exception):
  """Stands for a kill in the middle of an ablation."""


def fake_metric(config) -> float:
  """A final metric that depends on the cell and the seed."""
  return round(0.1 * config.model.mlp_dim / 32 + 0.01 * config.seed ** 2, 6)


@pytest.fixture
def fake_trainer(monkeypatch):
  """Replaces training: records each run's workdir, writes final metrics.

  Set `calls.stop_at` to raise _Stop on that call (1-based).
  """
  class Calls(list):
    stop_at = None

  calls = Calls()

  def train_and_evaluate(config, workdir, **kwargs):
    del kwargs
    calls.append(os.path.relpath(workdir))
    if len(calls) == calls.stop_at:
      raise _Stop()
    # As the trainer: several seeds write WORKDIR/seed_S/ each.
    runs = {workdir: config}
    if config.num_seeds > 1:
      runs = {}
      for seed in range(config.seed, config.seed + config.num_seeds):
        runs[os.path.join(workdir, f'seed_{seed}')] = copy.deepcopy(config)
        runs[os.path.join(workdir, f'seed_{seed}')].seed = seed
    for path, run in runs.items():
      final = {'eval/exact_match': fake_metric(run),
               'eval/loss': 1.0 - fake_metric(run), 'eval/accuracy': 0.5}
      os.makedirs(path, exist_ok=True)
      with open(os.path.join(path, 'final_metrics.json'), 'w') as f:
        json.dump(final, f)
    return final

  monkeypatch.setattr(train, 'train_and_evaluate', train_and_evaluate)
  monkeypatch.setattr(ablation, 'train_step_flops', lambda config, exp: 4e6)
  return calls


def test_rerun_trains_only_what_is_missing(fake_trainer, tmp_path,
                                           monkeypatch):
  monkeypatch.chdir(tmp_path)
  c = tiny_ablation(axes=(base.axis('mlp', {'model.mlp_dim': (32, 64, 96)}),))
  fake_trainer.stop_at = 4  # Killed in cell 2 after its seed 0 finished.
  with pytest.raises(_Stop):
    ablation.run_ablation(c, 'abl')
  assert fake_trainer == ['abl/cells/mlp-32/seed_0', 'abl/cells/mlp-32/seed_1',
                          'abl/cells/mlp-64/seed_0', 'abl/cells/mlp-64/seed_1']
  first_cell = 'abl/cells/mlp-32/cell.json'
  assert not os.path.exists('abl/cells/mlp-64/cell.json')
  # The partial report already holds the finished cell.
  with open('abl/results.md') as f:
    assert f.readline().startswith('# Ablation: 1 of 3 cells finished')
  stamp = os.stat(first_cell).st_mtime_ns

  fake_trainer.clear()
  fake_trainer.stop_at = None
  report = ablation.run_ablation(c, 'abl')
  assert fake_trainer == ['abl/cells/mlp-64/seed_1', 'abl/cells/mlp-96/seed_0',
                          'abl/cells/mlp-96/seed_1']
  assert os.stat(first_cell).st_mtime_ns == stamp
  assert report['finished_cells'] == 3

  fake_trainer.clear()  # Everything finished: nothing trains.
  ablation.run_ablation(c, 'abl')
  assert fake_trainer == []


def test_report_numbers(fake_trainer, tmp_path):
  workdir = str(tmp_path)
  report = ablation.run_ablation(tiny_ablation(), workdir)
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f) == json.loads(json.dumps(report))
  narrow, wide = report['cells']
  cell = {}
  for row in (narrow, wide):
    with open(os.path.join(workdir, 'cells', row['name'], 'cell.json')) as f:
      cell[row['name']] = json.load(f)
  values = [cell['mlp-wide']['final_metrics'][s]['eval/exact_match']
            for s in ('0', '1')]
  assert values == [0.2, 0.21]
  entry = wide['metrics']['eval/exact_match']
  assert entry['mean'] == pytest.approx(np.mean(values))
  assert entry['ci95'] == pytest.approx(stats.mean_and_ci95(values)[1])
  versus = entry['vs_baseline']
  # The seed term cancels in each pair: every difference is exactly 0.1.
  assert versus['mean_difference'] == pytest.approx(0.1)
  assert versus['p_value'] == pytest.approx(0.0, abs=1e-9)
  assert 'vs_baseline' not in narrow['metrics']['eval/exact_match']
  assert wide['flops_per_example'] == 4e6 / 8
  assert wide['flops_per_seed'] == 4e6 * 3

  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read()
  row = next(l for l in table.splitlines() if l.startswith('| `mlp-wide`'))
  assert '| **0.205 ± 0.06353** | +0.1 | < 0.001 |' in row
  assert f"| {wide['parameters']['unique']:,} |" in row
  for name in ('bars_eval_exact_match.png',
               'eval_loss_vs_unique_parameters.png'):
    assert os.path.getsize(os.path.join(workdir, 'plots', name)) > 1000


def test_seeds_in_one_program_train_each_cell_once(fake_trainer, tmp_path):
  workdir = str(tmp_path)
  report = ablation.run_ablation(
      tiny_ablation(seeds_in_one_program=True, num_seeds=3, first_seed=5),
      workdir)
  assert [os.path.basename(c) for c in fake_trainer] == ['mlp-narrow',
                                                          'mlp-wide']
  wide = report['cells'][1]['metrics']['eval/exact_match']
  assert wide['values'] == {str(s): fake_metric(ml_collections.ConfigDict(
      {'model': {'mlp_dim': 64}, 'seed': s})) for s in (5, 6, 7)}


def test_a_workdir_of_another_ablation_is_refused(fake_trainer, tmp_path,
                                                  monkeypatch):
  workdir = str(tmp_path)
  ablation.run_ablation(tiny_ablation(), workdir)
  with pytest.raises(UserError, match=r'holds an ablation of another config '
                     r'\(budget.value: 3.0 -> 4.0\)'):
    ablation.run_ablation(tiny_ablation(**{'budget.value': 4.0}), workdir)
  # So is an edit of the experiment config file behind it.
  load = config_files.load_config

  def edited(path):
    config = load(path)
    config.optimizer.learning_rate = 0.01
    return config

  with monkeypatch.context() as patch:
    patch.setattr(config_files, 'load_config', edited)
    with pytest.raises(UserError, match=r"\(cell 'mlp-narrow' optimizer."
                       r'learning_rate: 0.001 -> 0.01; cell'):
      ablation.run_ablation(tiny_ablation(), workdir)
  # What is reported may change: the cells stay finished.
  fake_trainer.clear()
  ablation.run_ablation(tiny_ablation(metrics=(('eval/accuracy', 'higher'),)),
                        workdir)
  assert fake_trainer == []


def test_a_metric_the_runs_lack_is_one_line(fake_trainer, tmp_path):
  with pytest.raises(UserError, match="names 'eval/bleu', which cell "
                     "'mlp-narrow' does not report .*eval/exact_match"):
    ablation.run_ablation(tiny_ablation(metrics=(('eval/bleu', 'higher'),)),
                          str(tmp_path))


# ---- The real thing, tiny ----------------------------------------------------


def test_tiny_ablation_end_to_end(fake_data_dir, tmp_path):
  """Two cells x 2 seeds of real training (a tiny CNN on the fake images),
  with a compute-matched budget.

  The cells differ only in their data (mirrored or not), so every program
  after the first run's comes from the compilation cache.
  """
  workdir = str(tmp_path)
  c = base.get_config()
  c.base_config = os.path.join(ROOT, 'configs/cnn_fashion_mnist.py:smoke')
  c.overrides = base.nested({
      'data.tfds_data_dir': fake_data_dir, 'model.features': (4, 8),
      'model.dense_features': 16, 'eval_batch_size': 200,
      'write_plots': False})
  c.axes = (base.axis('flip', {'data.augment.horizontal_flip': (False, True)},
                      labels=('no', 'yes')),)
  c.num_seeds = 2
  c.budget.kind = 'flops'
  c.budget.value = flops_budget = 1e8
  c.metrics = (('eval/accuracy', 'higher'), ('eval/loss', 'lower'))
  c.plot.x = 'flops_per_seed'
  report = ablation.run_ablation(c, workdir)
  for row in report['cells']:
    cell_dir = os.path.join(workdir, 'cells', row['name'])
    losses = []
    for seed in (0, 1):
      with open(os.path.join(cell_dir, f'seed_{seed}',
                             'final_metrics.json')) as f:
        losses.append(json.load(f)['eval/loss'])
    assert losses[0] != losses[1]
    assert row['metrics']['eval/loss']['mean'] == pytest.approx(
        np.mean(losses))
    assert row['steps'] == math.ceil(flops_budget / row['flops_per_step'])
    assert flops_budget <= row['flops_per_seed'] < (
        flops_budget + row['flops_per_step'])
    assert row['examples_per_sec'] > 0
  versus = report['cells'][1]['metrics']['eval/loss']['vs_baseline']
  assert 0 <= versus['p_value'] <= 1
  for name in ('results.md', 'plots/bars_eval_loss.png',
               'plots/eval_accuracy_vs_flops_per_seed.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0


# ---- Shipped ablation configs and the entry point ----------------------------

SHIPPED = sorted(
    os.path.splitext(os.path.basename(p))[0]
    for p in glob.glob(os.path.join(ROOT, 'configs', 'ablations', '*.py'))
    if os.path.basename(p) not in ('__init__.py', 'base.py'))


def test_shipped_configs_declare_no_key_beyond_base():
  def keys(c, prefix=''):
    out = set()
    for k, v in c.items():
      out.add(prefix + k)
      if hasattr(v, 'items') and prefix + k != 'overrides':
        out |= keys(v, f'{prefix}{k}.')
    return out

  assert SHIPPED
  for name in SHIPPED:
    config = importlib.import_module(f'configs.ablations.{name}').get_config()
    assert keys(config) <= keys(base.get_config()), name


# The data each shipped ablation reads, replaced by the fake datasets.
_DATA = {'albert_sharing': 'text', 'heads_dk': 'text',
         'tied_embeddings': 'text',
         'families_fashion_mnist': 'images',
         'regularization_fashion_mnist': 'images',
         'lstm_vs_transformer_length': None}


@pytest.mark.parametrize('name', SHIPPED)
def test_shipped_config_builds_every_cell(name, fake_data_dir,
                                          fake_shakespeare_data_dir,
                                          monkeypatch):
  """Each shipped ablation, and its smoke variant, plans on the fake data."""
  monkeypatch.chdir(ROOT)
  module = importlib.import_module(f'configs.ablations.{name}')
  for arg in (None, 'smoke'):
    c = module.get_config(arg)
    if _DATA[name] == 'images':
      c.overrides.update(base.nested({'data.tfds_data_dir': fake_data_dir}))
    elif _DATA[name] == 'text':
      c.overrides.update(base.nested({
          'data.tfds_data_dir': fake_shakespeare_data_dir,
          'model.vocab_size': _fake_vocab(fake_shakespeare_data_dir)}))
    cells = ablation.plan(c)
    assert len(cells) == len({cell.name for cell in cells}) > 1
    assert all(cell.parameters['unique'] > 0 for cell in cells)


def _fake_vocab(data_dir):
  from bigjax import losses
  from bigjax import tasks
  from configs import transformer_shakespeare
  config = transformer_shakespeare.get_config()
  config.data.tfds_data_dir = data_dir
  return tasks.make_task(config, losses.make_loss(config.loss)).info.vocab_size


def test_entry_point_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.ablate',
       '--config=configs/ablations/tied_embeddings.py:smoke',
       f'--workdir={tmp_path}', '--config.budget.kind=step'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
      "error: config.budget.kind='step' is not one of 'steps', 'examples', "
      "'epochs', 'flops' (did you mean 'steps'?)"]
  assert os.listdir(tmp_path) == []
