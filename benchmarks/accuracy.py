r"""Trains configs from scratch and reports test accuracy against wall time.

  python -m benchmarks.accuracy --config=configs/cnn_fashion_mnist.py \
      [--config=configs/lstm_fashion_mnist.py ...] [--root=/tmp/bench] \
      [--json=results.json]

Each config trains in a fresh workdir under --root (deleted first if it holds
an earlier benchmark run of the same config). Prints one JSON record per
config and a Markdown table: parameters, test accuracy, training wall time
(from the first step to the end, compilation included) and throughput.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402

from benchmarks import report  # noqa: E402
from bigjax import metric_writers  # noqa: E402
from bigjax import train  # noqa: E402

_CONFIGS = flags.DEFINE_multi_string(
    'config', [], 'Config files (with optional :variant) to benchmark.')
_ROOT = flags.DEFINE_string('root', '/tmp/bigjax_benchmarks',
                            'Parent folder of the benchmark workdirs.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')
def benchmark(config_path: str) -> dict:
  config = report.load_config(config_path)
  name = os.path.basename(config_path).replace('.py', '').replace(':', '_')
  workdir = report.fresh_workdir(os.path.join(_ROOT.value, name))
  exp = train.build_experiment(config)
  counts = train.parameter_counts(exp)
  start = time.perf_counter()
  final = train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - start
  history = metric_writers.read_history(workdir)
  speeds = [r['train/examples_per_sec'] for r in history
            if 'train/examples_per_sec' in r]
  return {
      'config': config_path,
      'parameters_unique': counts['unique'],
      'parameters_effective': counts['effective'],
      'test_accuracy': final['eval/accuracy'],
      'macro_f1': final['eval/macro_f1'],
      'train_wall_s': round(wall, 1),
      'steps': exp.num_steps,
      'batch_size': config.batch_size,
      'median_examples_per_sec': round(sorted(speeds)[len(speeds) // 2], 1),
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
  }


def main(argv):
  del argv
  records = []
  for path in _CONFIGS.value:
    record = benchmark(path)
    print(json.dumps(record), flush=True)
    records.append(record)
  report.write(records, [
      ('config', lambda r: r['config']),
      ('parameters', lambda r: f"{r['parameters_unique']:,}"),
      ('test accuracy', lambda r: f"{100 * r['test_accuracy']:.2f}%"),
      ('training wall time', lambda r: f"{r['train_wall_s'] / 60:.1f} min"),
      ('examples/s', lambda r: f"{r['median_examples_per_sec']:,.0f}"),
  ], json_path=_JSON.value)

if __name__ == '__main__':
  app.run(main)
