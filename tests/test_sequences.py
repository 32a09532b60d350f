"""Sequence tasks through the real training function and generate command.

Tiny models on the fake Shakespeare corpus and on generated tasks: the loop,
the metrics, samples and generation work end to end (the benchmarks measure
how well they learn).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from bigjax import generate
from bigjax import metric_writers
from bigjax import train
from bigjax.errors import UserError
from configs import lstm_shakespeare
from configs import shakespeare_play_finetune
from configs import transformer_seq2seq
from configs import transformer_shakespeare
from tests.conftest import ROOT


def _tiny(config, data_dir=None, steps=12):
  if data_dir is not None:
    config.data.tfds_data_dir = data_dir
  config.data.seq_len = 32
  config.num_train_steps = config.eval_every_steps = steps
  config.checkpoint.save_every_steps = steps
  config.log_every_steps = 2
  config.eval_batch_size = 64
  config.batch_size = 16
  config.write_plots = False
  config.samples.num_tokens = 20
  if 'd_model' in config.model:
    config.model.d_model, config.model.num_layers = 32, 1
    config.model.mlp_dim, config.model.max_len = 64, 32
  return config


@pytest.fixture(scope='module')
def lm_run(fake_shakespeare_data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lm') / 'run')
  config = _tiny(transformer_shakespeare.get_config('smoke'),
                 fake_shakespeare_data_dir)
  config.model.vocab_size = _vocab(config)
  final = train.train_and_evaluate(config, workdir)
  return workdir, final, config


def _vocab(config):
  from bigjax import tasks
  from bigjax import losses
  return tasks.make_task(config, losses.make_loss(config.loss)).info.vocab_size


def test_language_model_trains_reports_and_samples(lm_run):
  workdir, final, _ = lm_run
  history = metric_writers.read_history(workdir)
  losses = [r['train/loss'] for r in history if 'train/loss' in r]
  assert losses[-1] < losses[0]
  assert final['eval/bits_per_token'] == pytest.approx(
      final['eval/loss'] / math.log(2))
  assert final['eval/perplexity'] == pytest.approx(math.exp(final['eval/loss']),
                                                   rel=1e-5)
  with open(os.path.join(workdir, 'samples.txt')) as f:
    samples = f.read()
  assert samples.startswith('==== step 12 ====\n\n')
  assert os.path.exists(os.path.join(workdir, 'tokenizer.json'))


def test_generate_is_reproducible_and_beam_one_is_greedy(lm_run):
  workdir, _, _ = lm_run
  kwargs = dict(max_len=15)
  a = generate.generate(workdir, 'To be', method='sample', seed=3,
                        num_samples=2, **kwargs)
  b = generate.generate(workdir, 'To be', method='sample', seed=3,
                        num_samples=2, **kwargs)
  assert a == b and len(a) == 2
  greedy = generate.generate(workdir, 'To be', method='greedy', **kwargs)
  beam = generate.generate(workdir, 'To be', method='beam', beam_size=1,
                           **kwargs)
  assert beam == greedy


def test_generate_command_prints_the_continuation(lm_run):
  workdir, _, _ = lm_run
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.generate', f'--workdir={workdir}',
       '--prompt=ROMEO:', '--max_len=10', '--method=greedy'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('ROMEO:')
  bad = subprocess.run(
      [sys.executable, '-m', 'experiments.generate', '--workdir=/nonexistent',
       '--prompt=x'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'holds no run' in bad.stderr
  assert len(bad.stderr.strip().splitlines()) == 1


def test_lstm_language_model_trains(fake_shakespeare_data_dir, tmp_path):
  config = _tiny(lstm_shakespeare.get_config('smoke'),
                 fake_shakespeare_data_dir, steps=4)
  config.model.vocab_size = _vocab(config)
  config.model.hidden_size = 32
  final = train.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(final['eval/loss'])


def test_fine_tune_from_the_language_model(lm_run, fake_shakespeare_data_dir,
                                           tmp_path):
  _, _, lm_config = lm_run
  config = _tiny(shakespeare_play_finetune.get_config('smoke'),
                 fake_shakespeare_data_dir, steps=4)
  config.model.vocab_size = lm_config.model.vocab_size
  config.model.num_classes = 36
  config.init_from.workdir = lm_run[0]
  final = train.train_and_evaluate(config, str(tmp_path))
  assert 0 <= final['eval/accuracy'] <= 1 and final['eval/num_examples'] > 0


def test_seq2seq_trains_and_answers(tmp_path):
  config = _tiny(transformer_seq2seq.get_config('addition,smoke'), steps=6)
  config.data.synthetic.num_eval_examples = 64
  final = train.train_and_evaluate(config, str(tmp_path))
  for key in ('eval/exact_match', 'eval/accuracy', 'eval/loss'):
    assert np.isfinite(final[key])
  assert final['eval/num_sequences'] == 64
  (answer,) = generate.generate(str(tmp_path), '12+34=', max_len=4,
                                method='greedy')
  assert set(answer) <= set('0123456789')


def test_zero_padded_addition_prompts():
  """A run trained on zero-padded operands reads prompts written without."""
  assert generate._zero_pad_operands('12+345=', 5) == '00012+00345='
  with pytest.raises(UserError, match='more than 5 digits'):
    generate._zero_pad_operands('123456+1=', 5)
  with pytest.raises(UserError, match='not an addition'):
    generate._zero_pad_operands('12-3=', 5)
