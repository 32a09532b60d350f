"""Tests of the TFDS builder and the input pipeline, on small fake idx files.

Most tests read `fake_data_dir` (conftest.py): 512 train and 200 test fake
images whose pixels and labels `conftest.fake_images` regenerates exactly.
"""

import gzip
import os
import re
import struct
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from bigjax.data import fashion_mnist_local
from bigjax.data import input_pipeline
from bigjax.errors import UserError
from configs import base
from tests import conftest
from tests.train_utils import assert_batches_equal
from tests.train_utils import simulate_processes
from tests.train_utils import take

DEBIAN_DIR = '/usr/share/datasets/fashion-mnist'


def data_config(data_dir, *, crop_padding=0, horizontal_flip=False,
                prefetch_threads=0):
  c = base.get_config().data
  c.tfds_data_dir = data_dir
  c.augment.crop_padding = crop_padding
  c.augment.horizontal_flip = horizontal_flip
  c.prefetch_threads = prefetch_threads
  return c


def raw_pixels(images, config):
  """Inverts the standardisation: float32 [B, H, W, C] -> uint8 pixels."""
  mean, std = np.float32(config.mean), np.float32(config.std)
  return np.rint((images * std + mean) * 255).astype(np.uint8)


def fake_split(split):
  """The exact uint8 images [N, 28, 28, 1] and labels [N] of `fake_data_dir`."""
  num, seed = {'train': (conftest.NUM_TRAIN, 0),
               'test': (conftest.NUM_TEST, 1)}[split]
  images, labels = conftest.fake_images(num, seed)
  return images[..., None], labels


def example_ids(batch, config, split='train'):
  """The index in the idx file of each (unaugmented) image of a batch."""
  images, _ = fake_split(split)
  by_bytes = {image.tobytes(): i for i, image in enumerate(images)}
  return np.array([by_bytes[x.tobytes()]
                   for x in raw_pixels(batch['image'], config)])




# ---- The builder -------------------------------------------------------------


def test_prepared_data_round_trips_idx_pixels_and_labels(fake_data_dir):
  config = data_config(fake_data_dir)
  for split in ('train', 'test'):
    want_images, want_labels = fake_split(split)
    # TFDS's own decoding of the records...
    source = tfds.data_source('fashion_mnist_local', split=split,
                              data_dir=fake_data_dir, download=False)
    records = source.__getitems__(list(range(len(source))))
    np.testing.assert_array_equal(
        np.stack([r['image'] for r in records]), want_images)
    np.testing.assert_array_equal([r['label'] for r in records], want_labels)
    # ...and the pipeline's fast parsing of the same records.
    reader = input_pipeline._Reader(config, split)
    images, labels = reader.read(np.arange(len(want_labels)))
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    np.testing.assert_array_equal(images, want_images)
    np.testing.assert_array_equal(labels, want_labels)


def test_dataset_info(fake_data_dir):
  info = input_pipeline.dataset_info(data_config(fake_data_dir))
  assert info == input_pipeline.DatasetInfo(
      num_classes=10, class_names=fashion_mnist_local.CLASS_NAMES,
      image_shape=(28, 28, 1), num_train_examples=conftest.NUM_TRAIN,
      num_eval_examples=conftest.NUM_TEST)
  assert info.class_names[0] == 'T-shirt/top'
  assert info.class_names[9] == 'Ankle boot'


@pytest.mark.parametrize('damage, expected', [
    (lambda header, body: header[:3] + b'\x04' + body, 'magic'),  # 4 dims.
    (lambda header, body: header + body[:-1], 'data bytes'),  # Truncated data.
    (lambda header, body: header[:6], 'only 6 bytes'),  # Truncated header.
])
def test_read_idx_rejects_corrupt_files(tmp_path, damage, expected):
  images = np.zeros((2, 28, 28), np.uint8)
  header = struct.pack('>BBBB3I', 0, 0, 0x08, 3, *images.shape)
  path = tmp_path / 'images.gz'
  with gzip.open(path, 'wb') as f:
    f.write(damage(header, images.tobytes()))
  with pytest.raises(UserError, match=expected) as e:
    fashion_mnist_local.read_idx(str(path), ndim=3)
  assert '\n' not in str(e.value)


def test_read_idx_rejects_non_gzip_and_missing_files(tmp_path):
  path = tmp_path / 'labels.gz'
  path.write_bytes(b'not gzip at all')
  with pytest.raises(UserError, match='corrupt'):
    fashion_mnist_local.read_idx(str(path), ndim=1)
  with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist'):
    fashion_mnist_local.read_idx(str(tmp_path / 'missing.gz'), ndim=1)


def test_prepare_without_idx_files_names_the_package(tmp_path, monkeypatch):
  monkeypatch.setenv('BIGJAX_FASHION_MNIST_DIR', str(tmp_path / 'empty'))
  with pytest.raises(UserError, match='apt-get install dataset-fashion-mnist'):
    input_pipeline.prepare('fashion_mnist_local', str(tmp_path / 'tfds'))


def test_prepare_is_idempotent(fake_data_dir):
  files = os.path.join(input_pipeline.dataset_dir(
      'fashion_mnist_local', fake_data_dir), 'dataset_info.json')
  before = os.stat(files).st_mtime_ns
  input_pipeline.prepare('fashion_mnist_local', fake_data_dir)
  assert os.stat(files).st_mtime_ns == before


def test_prepare_data_cli_prints_one_line_and_exits_2(tmp_path):
  env = dict(os.environ, BIGJAX_FASHION_MNIST_DIR=str(tmp_path / 'empty'))
  result = subprocess.run(
      [sys.executable, '-m', 'experiments.prepare_data',
       '--dataset=fashion_mnist_local', f'--data_dir={tmp_path / "tfds"}'],
      cwd=conftest.ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'dataset-fashion-mnist' in last


@pytest.mark.skipif(not os.path.isdir(DEBIAN_DIR),
                    reason='apt-get install dataset-fashion-mnist')
def test_prepare_real_debian_files(tmp_path, monkeypatch):
  monkeypatch.delenv('BIGJAX_FASHION_MNIST_DIR', raising=False)
  input_pipeline.prepare('fashion_mnist_local', str(tmp_path))  # ~13 s.
  info = input_pipeline.dataset_info(data_config(str(tmp_path)))
  assert (info.num_train_examples, info.num_eval_examples) == (60000, 10000)
  first = next(input_pipeline.eval_batches(data_config(str(tmp_path)),
                                           global_batch_size=8))
  images, labels = fashion_mnist_local.read_split(DEBIAN_DIR, 'test')
  config = data_config(str(tmp_path))
  np.testing.assert_array_equal(raw_pixels(first['image'], config), images[:8])
  np.testing.assert_array_equal(first['label'], labels[:8])


# ---- Training batches --------------------------------------------------------


def test_train_batches_shapes_and_standardisation(fake_data_dir):
  config = data_config(fake_data_dir)
  batch = next(input_pipeline.train_batches(
      config, global_batch_size=32, seed=0))
  assert batch['image'].shape == (32, 28, 28, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].shape == (32,) and batch['label'].dtype == np.int32
  images, labels = fake_split('train')
  ids = example_ids(batch, config)
  want = (images[ids] / 255 - 0.2860) / 0.3530
  np.testing.assert_allclose(batch['image'], want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(batch['label'], labels[ids])


def test_train_batches_are_deterministic_per_seed(fake_data_dir):
  config = data_config(fake_data_dir, crop_padding=2, horizontal_flip=True)
  run = lambda seed: take(input_pipeline.train_batches(
      config, global_batch_size=32, seed=seed), 5)
  assert_batches_equal(run(3), run(3))
  other = run(4)
  assert not np.array_equal(run(3)[0]['label'], other[0]['label'])


def test_prefetch_threads_do_not_change_the_batches(fake_data_dir):
  run = lambda threads: take(input_pipeline.train_batches(
      data_config(fake_data_dir, crop_padding=2, horizontal_flip=True,
                  prefetch_threads=threads),
      global_batch_size=32, seed=0), 12)
  assert_batches_equal(run(2), run(0))


def test_each_epoch_is_a_new_permutation(fake_data_dir):
  # 48 does not divide 512, so batches straddle epochs; nothing is dropped.
  config = data_config(fake_data_dir)
  n = conftest.NUM_TRAIN
  batches = take(input_pipeline.train_batches(
      config, global_batch_size=48, seed=0), -(-3 * n // 48))
  ids = np.concatenate([example_ids(b, config) for b in batches])
  epochs = [ids[e * n:(e + 1) * n] for e in range(3)]
  for order in epochs:
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])
  assert not np.array_equal(epochs[0], np.arange(n))


def test_start_step_resumes_exactly(fake_data_dir):
  config = data_config(fake_data_dir, crop_padding=2, horizontal_flip=True)
  from_zero = take(input_pipeline.train_batches(
      config, global_batch_size=48, seed=1), 15)
  resumed = take(input_pipeline.train_batches(
      config, global_batch_size=48, seed=1, start_step=11), 4)
  assert_batches_equal(resumed, from_zero[11:])


def test_processes_read_disjoint_slices_of_the_global_batch(
    fake_data_dir, monkeypatch):
  config = data_config(fake_data_dir, crop_padding=3, horizontal_flip=True)
  run = lambda: take(input_pipeline.train_batches(
      config, global_batch_size=32, seed=5, start_step=7), 3)
  global_batches = run()
  per_process = []
  for index in range(2):
    simulate_processes(monkeypatch, 2, index)
    per_process.append(run())
  for step, want in enumerate(global_batches):
    got = [batches[step] for batches in per_process]
    assert got[0]['label'].shape == (16,)
    for k in want:
      np.testing.assert_array_equal(
          np.concatenate([g[k] for g in got]), want[k], err_msg=k)


def test_batch_size_must_divide_by_process_count(fake_data_dir, monkeypatch):
  simulate_processes(monkeypatch, 3, 0)
  with pytest.raises(UserError, match='divide by the number of processes'):
    input_pipeline.train_batches(
        data_config(fake_data_dir), global_batch_size=32, seed=0)


def test_augment_crop_pads_with_black_and_flip_mirrors():
  image = np.arange(1, 13, dtype=np.uint8).reshape(1, 3, 4, 1)
  crop = lambda dy, dx, flip=False: input_pipeline.augment(
      image, offsets=np.array([[dy, dx]]), flips=np.array([flip]),
      crop_padding=1)[0, ..., 0]
  np.testing.assert_array_equal(crop(1, 1), image[0, ..., 0])  # No shift.
  # Offset (0, 0): the image moves down and right by one, zeros enter.
  np.testing.assert_array_equal(crop(0, 0), [[0, 0, 0, 0],
                                             [0, 1, 2, 3],
                                             [0, 5, 6, 7]])
  # Offset (2, 1): the image moves up by one.
  np.testing.assert_array_equal(crop(2, 1), [[5, 6, 7, 8],
                                             [9, 10, 11, 12],
                                             [0, 0, 0, 0]])
  np.testing.assert_array_equal(crop(1, 1, flip=True), image[0, :, ::-1, 0])
  np.testing.assert_array_equal(crop(0, 2, flip=True), [[0, 0, 0, 0],
                                                        [0, 4, 3, 2],
                                                        [0, 8, 7, 6]])
  flipped = input_pipeline.augment(image, offsets=np.zeros((1, 2), int),
                                   flips=np.array([True]), crop_padding=0)
  np.testing.assert_array_equal(flipped, image[:, :, ::-1])


def test_train_batches_augment_as_drawn(fake_data_dir):
  """The pipeline's images are `augment` of the raw images with its draws."""
  plain = data_config(fake_data_dir)
  config = data_config(fake_data_dir, crop_padding=2, horizontal_flip=True)
  raw = take(input_pipeline.train_batches(
      plain, global_batch_size=64, seed=2), 2)
  augmented = take(input_pipeline.train_batches(
      config, global_batch_size=64, seed=2), 2)
  for step in range(2):
    offsets, flips = input_pipeline._augmentation_draws(2, step, 64, 2)
    assert 0 < flips.sum() < 64 and len(np.unique(offsets)) == 5
    want = input_pipeline.augment(
        raw_pixels(raw[step]['image'], plain), offsets=offsets, flips=flips,
        crop_padding=2)
    np.testing.assert_array_equal(
        raw_pixels(augmented[step]['image'], config), want)
    np.testing.assert_array_equal(augmented[step]['label'], raw[step]['label'])


# ---- Evaluation batches ------------------------------------------------------


@pytest.mark.parametrize('num_processes', [1, 2])
def test_eval_batches_cover_every_example_once(
    fake_data_dir, monkeypatch, num_processes):
  config = data_config(fake_data_dir)
  n, batch_size = conftest.NUM_TEST, 64  # 200 = 3 * 64 + 8.
  per_process = []
  for index in range(num_processes):
    simulate_processes(monkeypatch, num_processes, index)
    per_process.append(list(input_pipeline.eval_batches(
        config, global_batch_size=batch_size)))
  assert all(len(batches) == 4 for batches in per_process)
  batches = [{k: np.concatenate([p[i][k] for p in per_process]) for k in b}
             for i, b in enumerate(per_process[0])]
  for b in batches:
    assert b['image'].shape == (batch_size, 28, 28, 1)
    assert b['mask'].dtype == np.float32
  mask = np.concatenate([b['mask'] for b in batches])
  np.testing.assert_array_equal(mask, np.arange(4 * batch_size) < n)
  images, labels = fake_split('test')
  real = np.concatenate([b['image'] for b in batches])[:n]
  np.testing.assert_array_equal(raw_pixels(real, config), images)
  np.testing.assert_array_equal(
      np.concatenate([b['label'] for b in batches])[:n], labels)
  assert not np.any(batches[-1]['image'][8:])  # Padding is zeros.


# ---- Errors ------------------------------------------------------------------


def test_missing_dataset_says_how_to_prepare_it(tmp_path):
  config = data_config(str(tmp_path))
  for make in (input_pipeline.dataset_info,
               lambda c: input_pipeline.train_batches(
                   c, global_batch_size=8, seed=0),
               lambda c: input_pipeline.eval_batches(c, global_batch_size=8)):
    with pytest.raises(UserError) as e:
      make(config)
    message = str(e.value)
    assert ('python -m experiments.prepare_data --dataset=fashion_mnist_local '
            f'--data_dir={tmp_path}') in message
    assert str(tmp_path) in message and '\n' not in message


@pytest.mark.parametrize('key, value, expected', [
    ('name', 'no_such_dataset', "Unknown dataset 'no_such_dataset'"),
    ('train_split', 'validation', "Bad split 'validation'"),
    ('eval_split', 'test[:300%]', "Bad split 'test[:300%]'"),
    ('label_key', 'class', "no feature 'class'"),
    ('image_key', 'label', 'uint8 images'),
    ('mean', (0.1, 0.2), 'config.data.mean'),
    ('std', (0.0,), 'must be positive'),
])
def test_config_errors_are_one_line(fake_data_dir, key, value, expected):
  config = data_config(fake_data_dir)
  config[key] = value
  with pytest.raises(UserError, match=re.escape(expected)) as e:
    input_pipeline.train_batches(config, global_batch_size=8, seed=0)
    input_pipeline.dataset_info(config)
  assert '\n' not in str(e.value)
