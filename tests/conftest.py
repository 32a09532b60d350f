"""Shared fixtures: a small learnable stand-in for Fashion-MNIST.

Tests never need the real 60,000 images: `fake_data_dir` writes idx files of
the same format (class-dependent patterns plus noise, so a CNN learns them in
a few dozen steps), prepares them with our TFDS builder into a temporary
data_dir, and returns that data_dir for `config.data.tfds_data_dir`.
"""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `configs` and `experiments` import from the root.
  sys.path.insert(0, ROOT)

from bigjax import platform  # noqa: E402

platform.set_cpu_xla_flags()

NUM_TRAIN, NUM_TEST = 512, 200


def write_idx(path, array: np.ndarray) -> None:
  """Writes a uint8 array as a gzipped idx file (magic 0x08, then dims)."""
  header = struct.pack('>BBBB', 0, 0, 0x08, array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  with gzip.open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def fake_images(num: int, seed: int):
  """uint8 [num, 28, 28] images and uint8 [num] labels in 10 classes.

  Class c lights up horizontal band c of the image (rows 2c+4 and 2c+5) over
  uniform noise: easy to learn, but only from the pixels.
  """
  rng = np.random.default_rng(seed)
  labels = np.arange(num) % 10
  rng.shuffle(labels)
  images = rng.integers(0, 120, size=(num, 28, 28))
  for i, c in enumerate(labels):
    images[i, 2 * c + 4: 2 * c + 6, 4:24] = 250
  return images.astype(np.uint8), labels.astype(np.uint8)


def write_fake_fashion_mnist(directory, num_train=NUM_TRAIN, num_test=NUM_TEST):
  os.makedirs(directory, exist_ok=True)
  for prefix, num, seed in (('train', num_train, 0), ('t10k', num_test, 1)):
    images, labels = fake_images(num, seed)
    write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), images)
    write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)


@pytest.fixture(scope='session')
def fake_data_dir(tmp_path_factory):
  """A TFDS data_dir holding `fashion_mnist_local` prepared from fake idx files."""
  root = tmp_path_factory.mktemp('fake_fashion_mnist')
  idx_dir, data_dir = root / 'idx', root / 'tfds'
  write_fake_fashion_mnist(idx_dir)
  from bigjax.data import input_pipeline
  old = os.environ.get('BIGJAX_FASHION_MNIST_DIR')
  os.environ['BIGJAX_FASHION_MNIST_DIR'] = str(idx_dir)
  try:
    input_pipeline.prepare('fashion_mnist_local', str(data_dir))
  finally:
    if old is None:
      del os.environ['BIGJAX_FASHION_MNIST_DIR']
    else:
      os.environ['BIGJAX_FASHION_MNIST_DIR'] = old
  return str(data_dir)
