r"""Trains and evaluates a model from a config file.

  python -m experiments.train --config=configs/cnn_fashion_mnist.py \
      --workdir=workdirs/cnn [--config.optimizer.learning_rate=0.01 ...]

Running the same command again with the same workdir resumes from the newest
checkpoint there. Config files are Python and run arbitrary code when loaded:
only use ones you trust. The loop itself is `bigjax.train.train_and_evaluate`.
"""

# XLA reads its flags when the first backend starts: set them before jax.
from bigjax import platform

platform.set_cpu_xla_flags()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bigjax import train  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Experiment config file, e.g. configs/cnn_fashion_mnist.py; a variant '
    'follows a colon (configs/cnn_fashion_mnist.py:smoke). Override any key '
    'with --config.KEY=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Directory for checkpoints, metrics, pictures and the resolved config. An '
    'existing run there is resumed.', required=True)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.log_own_info_only()
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
