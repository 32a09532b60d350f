r"""Pretrain, then fine-tune: does the language model help the downstream task?

  python -m benchmarks.finetune [--pretrain_steps=1500] [--finetune_steps=300] \
      [--seeds=3] [--d_model=128] [--num_layers=2] [--pretrained=LM_WORKDIR] \
      [--root=DIR] [--json=PATH]

1. Pretrains the character Transformer LM (configs/transformer_shakespeare.py,
   resized by --d_model/--num_layers) for --pretrain_steps.
2. For each of --seeds seeds, trains configs/shakespeare_play_finetune.py
   (which work is a 128-character passage from? 36 classes) for
   --finetune_steps twice: from the pretrained LM (`init_from`) and from
   scratch, with the same seed, data order and recipe.
3. Reports each run's held-out accuracy and macro F1, the mean and 95%
   interval of each arm, and of the paired differences (fine-tuned minus
   scratch, per seed).
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from benchmarks import report  # noqa: E402
from bigjax import train  # noqa: E402

_PRETRAIN_STEPS = flags.DEFINE_integer('pretrain_steps', 1500,
                                       'Language-model training steps.')
_FINETUNE_STEPS = flags.DEFINE_integer('finetune_steps', 300,
                                       'Downstream training steps per run.')
_SEEDS = flags.DEFINE_integer('seeds', 3, 'Seeds per arm.')
_D_MODEL = flags.DEFINE_integer('d_model', 128, 'Width of LM and classifier.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 2, 'Depth of both.')
_ROOT = flags.DEFINE_string('root', '/tmp/bigjax_benchmarks/finetune',
                            'Parent folder of the benchmark workdirs.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')
_PRETRAINED = flags.DEFINE_string(
    'pretrained', None, 'Reuse this finished language-model run (trained '
    'with the same --d_model/--num_layers) instead of pretraining.')


def _sized(config):
  config.model.d_model = _D_MODEL.value
  config.model.num_layers = _NUM_LAYERS.value
  config.model.mlp_dim = 4 * _D_MODEL.value
  config.progress_bar = False
  config.write_plots = False
  return config


def _run(config, workdir) -> tuple[dict, float]:
  start = time.perf_counter()
  final = train.train_and_evaluate(config, report.fresh_workdir(workdir))
  return final, time.perf_counter() - start


def main(argv):
  del argv
  records = []
  pretrained = _PRETRAINED.value
  if pretrained is None:
    lm = _sized(report.load_config('configs/transformer_shakespeare.py'))
    lm.num_train_steps = lm.eval_every_steps = _PRETRAIN_STEPS.value
    lm.checkpoint.save_every_steps = _PRETRAIN_STEPS.value
    pretrained = os.path.join(_ROOT.value, 'pretrain')
    final, wall = _run(lm, pretrained)
    records.append({'run': 'pretrain LM', 'seed': lm.seed,
                    'steps': lm.num_train_steps,
                    'metric': 'eval/loss (nats/char, held-out plays)',
                    'value': final['eval/loss'], 'wall_s': round(wall, 1)})
    print(json.dumps(records[-1]), flush=True)
  for seed in range(_SEEDS.value):
    for arm in ('fine-tuned', 'scratch'):
      config = _sized(report.load_config(
          'configs/shakespeare_play_finetune.py'))
      config.seed = seed
      config.num_train_steps = config.eval_every_steps = _FINETUNE_STEPS.value
      config.checkpoint.save_every_steps = _FINETUNE_STEPS.value
      if arm == 'fine-tuned':
        config.init_from.workdir = pretrained
      else:  # The same recipe without the pretrained body.
        config.optimizer.lr_multipliers = ()
      final, wall = _run(config, os.path.join(_ROOT.value, f'{arm}_{seed}'))
      records.append({'run': arm, 'seed': seed, 'steps': config.num_train_steps,
                      'metric': 'eval/accuracy (36 works)',
                      'value': final['eval/accuracy'],
                      'macro_f1': final['eval/macro_f1'],
                      'wall_s': round(wall, 1)})
      print(json.dumps(records[-1]), flush=True)
  report.write(records, [
      ('run', lambda r: r['run']), ('seed', lambda r: str(r['seed'])),
      ('steps', lambda r: str(r['steps'])), ('metric', lambda r: r['metric']),
      ('value', lambda r: f"{r['value']:.4f}"),
      ('wall', lambda r: f"{r['wall_s']:.0f} s")], json_path=_JSON.value)
  arms = {arm: [r['value'] for r in records if r['run'] == arm]
          for arm in ('fine-tuned', 'scratch')}
  arms['fine-tuned - scratch (paired)'] = [
      a - b for a, b in zip(arms['fine-tuned'], arms['scratch'])]
  summary = [{'arm': arm, 'n': len(v), 'mean_ci': report.mean_and_ci95(v)}
             for arm, v in arms.items()]
  report.write(summary, [
      ('arm', lambda r: r['arm']), ('seeds', lambda r: str(r['n'])),
      ('held-out accuracy, mean ± 95% CI',
       lambda r: f"{100 * r['mean_ci'][0]:.2f} ± {100 * r['mean_ci'][1]:.2f}"),
  ], title=f'Fine-tuning vs scratch at {_FINETUNE_STEPS.value} steps')


if __name__ == '__main__':
  app.run(main)
