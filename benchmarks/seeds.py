r"""Seeds in one program: N seeds trained vmapped against N runs one by one.

  python -m benchmarks.seeds [--config=configs/cnn_fashion_mnist.py] \
      [--num_seeds=8] [--steps=300] [--root=/tmp/bigjax_benchmarks/seeds] \
      [--json=seeds.json]

Both arms are the real `train.train_and_evaluate` (data pipeline, evals,
checkpoints and pictures included) of the same config for seeds 0..N-1 in
one process: the vmapped arm is one run with `config.num_seeds=N`, the
sequential arm N runs with `num_seeds=1`, as an ablation cell runs them with
`seeds_in_one_program` True or False. It prints the wall time of each arm,
their ratio, and the largest difference between the two arms' final metrics
per seed. Batched kernels sum in another order than a lone run's, so the
arms agree to float rounding after a few steps (`tests/test_seeds.py`: 1e-5
after 20) and drift apart like any two runs that differ by rounding over
hundreds of steps: compare accuracies and losses, not bits.
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

_CONFIG = flags.DEFINE_string(
    'config', 'configs/cnn_fashion_mnist.py', 'Experiment config FILE[:ARG].')
_NUM_SEEDS = flags.DEFINE_integer('num_seeds', 8, 'Seeds per arm.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Training steps of each run.')
_ROOT = flags.DEFINE_string('root', '/tmp/bigjax_benchmarks/seeds',
                            'Where the runs go (recreated).')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')


def _config(seed: int, num_seeds: int):
  config = report.load_config(_CONFIG.value)
  config.seed, config.num_seeds = seed, num_seeds
  config.num_train_steps = _STEPS.value
  config.progress_bar = False
  return config


def _final(path):
  with open(os.path.join(path, train.FINAL_METRICS_FILE)) as f:
    return json.load(f)


def main(argv):
  del argv
  seeds = range(_NUM_SEEDS.value)
  vmapped = report.fresh_workdir(os.path.join(_ROOT.value, 'vmapped'))
  sequential = report.fresh_workdir(os.path.join(_ROOT.value, 'sequential'))

  start = time.perf_counter()
  train.train_and_evaluate(_config(0, len(seeds)), os.path.join(vmapped, 'run'))
  vmapped_s = time.perf_counter() - start

  start = time.perf_counter()
  for seed in seeds:
    train.train_and_evaluate(_config(seed, 1),
                             os.path.join(sequential, f'seed_{seed}'))
  sequential_s = time.perf_counter() - start

  accuracy, loss = 0.0, 0.0
  for seed in seeds:
    a = _final(os.path.join(vmapped, 'run', f'seed_{seed}'))
    b = _final(os.path.join(sequential, f'seed_{seed}'))
    accuracy = max(accuracy, abs(a['eval/accuracy'] - b['eval/accuracy']))
    loss = max(loss, abs(a['eval/loss'] / b['eval/loss'] - 1))
  record = {
      'config': _CONFIG.value, 'num_seeds': len(seeds), 'steps': _STEPS.value,
      'vmapped_s': vmapped_s, 'sequential_s': sequential_s,
      'speedup': sequential_s / vmapped_s,
      'max_accuracy_difference': accuracy,
      'max_relative_loss_difference': loss,
  }
  report.write([record], [
      ('config', lambda r: r['config']),
      ('seeds', lambda r: str(r['num_seeds'])),
      ('steps', lambda r: str(r['steps'])),
      ('vmapped (s)', lambda r: f'{r["vmapped_s"]:.1f}'),
      ('sequential (s)', lambda r: f'{r["sequential_s"]:.1f}'),
      ('speedup', lambda r: f'{r["speedup"]:.2f}x'),
      ('max eval accuracy diff', lambda r: f'{r["max_accuracy_difference"]:.4f}'),
      ('max eval loss diff', lambda r: f'{r["max_relative_loss_difference"]:.1%}'),
  ], json_path=_JSON.value, title='Seeds in one program')


if __name__ == '__main__':
  app.run(main)
