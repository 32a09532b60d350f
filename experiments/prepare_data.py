r"""Prepares a TFDS dataset as ArrayRecord files for the input pipeline.

  python -m experiments.prepare_data --dataset=fashion_mnist_local \
      [--data_dir=DIR]

Running it again reuses data already prepared. `fashion_mnist_local` reads the
idx files of the Debian package dataset-fashion-mnist (or the directory in
$BIGJAX_FASHION_MNIST_DIR) and needs neither internet nor TensorFlow.
"""

from absl import app
from absl import flags

from bigjax.data import input_pipeline
from bigjax.errors import UserError
from experiments import cli

_DATASET = flags.DEFINE_string(
    'dataset', 'fashion_mnist_local', 'TFDS dataset name.')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', None,
    'TFDS data directory (config.data.tfds_data_dir); default '
    '$TFDS_DATA_DIR or ~/tensorflow_datasets.')


def main(argv):
  if len(argv) > 1:
    cli.fail(f'unexpected arguments {argv[1:]}; flags look like --name=value')
  try:
    input_pipeline.prepare(_DATASET.value, _DATA_DIR.value)
    where = input_pipeline.dataset_dir(_DATASET.value, _DATA_DIR.value)
  except UserError as e:
    cli.fail(str(e))
  print(f'Dataset {_DATASET.value} is prepared in {where}')


if __name__ == '__main__':
  app.run(main)
