r"""Runs an ablation: the cells of an ablation config, each over several seeds.

  python -m experiments.ablate --config=configs/ablations/albert_sharing.py \
      --workdir=workdirs/ablations/albert_sharing [--config.num_seeds=5 ...]

`--config.KEY=VALUE` overrides keys of the ablation config (declared in
configs/ablations/base.py), e.g. `--config.budget.value=600`; a variant
follows a colon (`configs/ablations/albert_sharing.py:smoke` runs the whole
ablation in miniature). Everything is checked before anything trains.

Running the same command again with the same workdir skips finished cells and
resumes a half-trained one from its checkpoints. WORKDIR/results.md holds the
table, WORKDIR/results.json every number, WORKDIR/plots/ the figures; all
three are rewritten whenever a cell finishes. Config files are Python and run
arbitrary code when loaded: only use ones you trust. The loop itself is
`bigjax.ablation.run_ablation`.
"""

# XLA reads its flags when the first backend starts: set them before jax.
from bigjax import platform

platform.set_cpu_xla_flags()

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bigjax import ablation  # noqa: E402
from bigjax.errors import UserError  # noqa: E402
from experiments import cli  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None,
    'Ablation config file, e.g. configs/ablations/albert_sharing.py; a '
    'variant follows a colon (configs/ablations/albert_sharing.py:smoke). '
    'Override any key with --config.KEY=VALUE.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None,
    'Directory for the cells\' runs and the results. An unfinished ablation '
    'there is continued.', required=True)


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  cli.log_own_info_only()
  try:
    ablation.run_ablation(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    cli.fail(str(e))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
