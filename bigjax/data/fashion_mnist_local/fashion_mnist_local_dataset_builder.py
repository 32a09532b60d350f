"""Fashion-MNIST as a TFDS dataset, built from the original idx `.gz` files.

TFDS's own `fashion_mnist` builder downloads from the internet and rejects
the Debian package's copies (same content, different gzip checksums), so this
builder reads them from disk instead: by default from
`/usr/share/datasets/fashion-mnist/` (`apt-get install dataset-fashion-mnist`),
or from the directory in $BIGJAX_FASHION_MNIST_DIR.

Features are `Tensor` and `ClassLabel`, not `Image`, so preparing and reading
need no TensorFlow; prepare with `file_format='array_record'`. The example
counts come from the idx headers, so tests can build tiny fake copies.
"""

import gzip
import os
import struct

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from bigjax import errors

DEFAULT_SOURCE_DIR = '/usr/share/datasets/fashion-mnist'
SOURCE_DIR_ENV = 'BIGJAX_FASHION_MNIST_DIR'

CLASS_NAMES = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)
IMAGE_SHAPE = (28, 28, 1)

# Split name -> (images file, labels file), as named by the original release.
_SPLIT_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
# idx magic numbers: two zero bytes, type code 0x08 (unsigned byte), ndim.
_IDX_UBYTE = 0x08


def source_dir() -> str:
  """The idx files' directory: $BIGJAX_FASHION_MNIST_DIR or the default."""
  return os.environ.get(SOURCE_DIR_ENV) or DEFAULT_SOURCE_DIR


def read_idx(path: str, ndim: int) -> np.ndarray:
  """Reads a gzipped idx file of unsigned bytes.

  Args:
    path: an idx `.gz` file (e.g. `train-images-idx3-ubyte.gz`).
    ndim: the number of dimensions the file must have (3 for images, 1 for
      labels); a file with another magic number is rejected.

  Returns:
    uint8 array with the shape from the header, e.g. [N, 28, 28] or [N].

  Raises:
    UserError: the file is missing, not gzip, or its header or length is wrong.
  """
  if not os.path.isfile(path):
    raise errors.UserError(
        f'Fashion-MNIST file {path} is missing: run `apt-get install '
        f'dataset-fashion-mnist` or set ${SOURCE_DIR_ENV} to a directory '
        'holding the idx .gz files.')
  try:
    with gzip.open(path, 'rb') as f:
      data = f.read()
  except (OSError, EOFError) as e:  # Not gzip, or truncated.
    raise errors.UserError(
        f'Fashion-MNIST file {path} is corrupt ({e}); reinstall it with '
        '`apt-get install --reinstall dataset-fashion-mnist`.') from None
  header_size = 4 + 4 * ndim
  if len(data) < header_size:
    raise errors.UserError(
        f'Fashion-MNIST file {path} is corrupt (only {len(data)} bytes); '
        'reinstall it with '
        '`apt-get install --reinstall dataset-fashion-mnist`.')
  magic = struct.unpack('>I', data[:4])[0]
  expected_magic = (_IDX_UBYTE << 8) | ndim
  shape = struct.unpack(f'>{ndim}I', data[4:header_size])
  num_values = int(np.prod(shape))
  if magic != expected_magic or len(data) != header_size + num_values:
    raise errors.UserError(
        f'Fashion-MNIST file {path} is corrupt (magic {magic:#010x}, expected '
        f'{expected_magic:#010x}; {len(data) - header_size} data bytes for '
        f'shape {shape}); reinstall it with '
        '`apt-get install --reinstall dataset-fashion-mnist`.')
  return np.frombuffer(data, np.uint8, offset=header_size).reshape(shape)


def read_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split's images [N, 28, 28, 1] uint8 and labels [N] uint8."""
  images_file, labels_file = _SPLIT_FILES[split]
  images = read_idx(os.path.join(directory, images_file), ndim=3)
  labels = read_idx(os.path.join(directory, labels_file), ndim=1)
  if images.shape[1:] != IMAGE_SHAPE[:2] or len(images) != len(labels):
    raise errors.UserError(
        f'Fashion-MNIST files for split {split!r} in {directory} do not match: '
        f'images {images.shape}, labels {labels.shape}; expected '
        f'[N, 28, 28] and [N]. Reinstall dataset-fashion-mnist.')
  if labels.size and labels.max() >= len(CLASS_NAMES):
    raise errors.UserError(
        f'Fashion-MNIST labels in {directory} for split {split!r} go up to '
        f'{labels.max()}, expected < {len(CLASS_NAMES)}. Reinstall '
        'dataset-fashion-mnist.')
  return images[..., None], labels


class Builder(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST from local idx files; registered as `fashion_mnist_local`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release, from the idx files on disk.'}
  # TFDS finds the builder's folder (for checksums.tsv) through
  # `importlib_resources`, which tensorflow-datasets imports lazily but does
  # not install; naming the file here makes preparing work without it.
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Fashion-MNIST (Xiao et al. 2017) from local idx files.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
        # Keep the idx files' order, so record i is example i of the original
        # release (TFDS would otherwise shuffle by key hash). The input
        # pipeline shuffles training data itself.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    directory = source_dir()
    # Read (and check) every file before TFDS starts writing anything.
    splits = {split: read_split(directory, split) for split in _SPLIT_FILES}
    return {split: self._generate_examples(*arrays)
            for split, arrays in splits.items()}

  def _generate_examples(self, images, labels):
    """Yields (key, example); the key is the position in the idx file."""
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
