r"""Trains and evaluates a model from a config file.

  python -m experiments.train --config=configs/cnn_fashion_mnist.py \
      --workdir=workdirs/cnn [--config.optimizer.learning_rate=0.01 ...]

Running the same command again with the same workdir resumes from the newest
checkpoint there.

Multi-host: start the same command on every host, with `--distributed` on a
cluster JAX recognises (Cloud TPU, SLURM, Open MPI, Kubernetes), or by hand
with `--coordinator_address=HOST0:PORT --num_processes=N --process_id=I`
(e.g. several processes on one machine, each with its own devices). Every
process reads its own share of the data; only process 0 writes logs and
pictures; all of them write checkpoints. Config files are Python and run arbitrary code when loaded:
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
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    'allow_config_change', False,
    'Resume a workdir even though the config now differs from its run\'s in '
    'keys that change the computation (model, data, optimiser, seed, ...).')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False,
    'Join a multi-process job whose cluster JAX detects (Cloud TPU, SLURM, '
    'Open MPI, Kubernetes).')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'host:port of process 0, for a manual multi-process launch (with '
    '--num_processes and --process_id).')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Number of processes of a manual launch.')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "This process's index in a manual launch, 0 to "
    'num_processes - 1.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.log_own_info_only()
  manual = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in manual) and None in manual:
    cli.fail('a manual multi-process launch needs all of --coordinator_address, '
             '--num_processes and --process_id')
  if _NUM_PROCESSES.value is not None and not (
      0 <= _PROCESS_ID.value < _NUM_PROCESSES.value):
    cli.fail(f'--process_id={_PROCESS_ID.value} must be in 0 .. '
             f'--num_processes - 1 = {_NUM_PROCESSES.value - 1}')
  platform.initialize_distributed(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      auto=_DISTRIBUTED.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                             allow_config_change=_ALLOW_CONFIG_CHANGE.value)
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
