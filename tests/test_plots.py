"""Tests for bigjax.plots: files are real PNGs, and the data reaching them is right."""

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pytest

from bigjax import plots

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def assert_png(path, min_kb=5):
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > min_kb * 1024, len(data)


def png_size(path):
  """(width, height) in pixels, read from the PNG's IHDR chunk."""
  with open(path, 'rb') as f:
    header = f.read(24)
  return (int.from_bytes(header[16:20], 'big'),
          int.from_bytes(header[20:24], 'big'))


HISTORY = [
    {'step': 0, 'train/loss': 2.3, 'train/learning_rate': 0.0},
    {'step': 100, 'train/loss': 1.5, 'train/learning_rate': 1e-3,
     'train/examples_per_sec': 900.0},
    {'step': 100, 'eval/loss': 1.7, 'eval/accuracy': 0.4},
    {'step': 200, 'train/loss': 1.1, 'train/accuracy': 0.6},
    {'step': 300, 'train/loss': 0.9, 'eval/loss': 1.2, 'eval/accuracy': 0.6},
    {'note': 'records without a step are skipped', 'train/loss': 99.0},
]


def test_curve_groups_collect_the_right_points():
  groups = plots._curve_groups(HISTORY)
  assert list(groups) == ['loss', 'accuracy', 'learning rate']
  assert set(groups['loss']) == {'train/loss', 'eval/loss'}
  steps, values = groups['loss']['train/loss']
  np.testing.assert_array_equal(steps, [0, 100, 200, 300])
  np.testing.assert_array_equal(values, [2.3, 1.5, 1.1, 0.9])
  steps, values = groups['accuracy']['eval/accuracy']
  np.testing.assert_array_equal(steps, [100, 300])
  np.testing.assert_array_equal(values, [0.4, 0.6])
  assert set(groups['accuracy']) == {'eval/accuracy', 'train/accuracy'}
  # examples_per_sec belongs to no group.
  assert all('train/examples_per_sec' not in g for g in groups.values())


def test_plot_curves(tmp_path):
  path = plots.plot_curves(HISTORY, tmp_path / 'a' / 'b' / 'curves.png',
                           title='smoke')
  assert path == str(tmp_path / 'a' / 'b' / 'curves.png')
  assert_png(path)
  # Only a loss group: one panel, so a third of the width of three panels.
  one = plots.plot_curves([{'step': 1, 'train/loss': 1.0}],
                          tmp_path / 'one.png')
  assert png_size(one)[0] * 3 == png_size(path)[0]


def test_plot_curves_without_data_still_writes(tmp_path):
  assert_png(plots.plot_curves([{'step': 0, 'train/examples_per_sec': 1.0}],
                               tmp_path / 'empty.png'), min_kb=1)


@pytest.mark.parametrize('channels', [1, 3])
def test_plot_predictions(tmp_path, channels):
  rng = np.random.default_rng(0)
  images = rng.normal(size=(30, 16, 16, channels)) * 50 + 7  # Any range.
  labels = rng.integers(0, 3, size=30)
  predictions = np.where(np.arange(30) % 2, labels, (labels + 1) % 3)
  path = plots.plot_predictions(images, labels, predictions,
                                tmp_path / f'pred{channels}.png',
                                class_names=['cat', 'dog', 'fox'])
  assert_png(path, min_kb=10)


def test_plot_predictions_grid_shape(tmp_path):
  # 10 images in a near-square grid: 4 columns, 3 rows.
  images = np.zeros((10, 8, 8, 3))
  path = plots.plot_predictions(images, np.zeros(10, int), np.zeros(10, int),
                                tmp_path / 'grid.png')
  assert png_size(path) == (round(1.8 * 4 * 100), round(1.9 * 3 * 100))


def test_rescale_for_display():
  image = np.array([[[-3.0], [1.0]], [[5.0], [np.nan]]])
  np.testing.assert_allclose(plots._rescale_for_display(image)[..., 0],
                             [[0.0, 0.5], [1.0, 0.375]])
  np.testing.assert_array_equal(
      plots._rescale_for_display(np.full((2, 2, 3), 4.0)), 0.0)


@pytest.mark.parametrize('normalize', [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
  confusion = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])
  path = plots.plot_confusion_matrix(
      confusion, tmp_path / 'cm.png', class_names=['cat', 'dog', 'fox'],
      normalize=normalize)
  assert_png(path)


def test_row_normalize_leaves_empty_rows_zero():
  np.testing.assert_allclose(
      plots._row_normalize(np.array([[3.0, 1.0], [0.0, 0.0]])),
      [[0.75, 0.25], [0.0, 0.0]])


def test_plot_attention(tmp_path):
  rng = np.random.default_rng(0)
  weights = rng.random((6, 5, 7))
  weights /= weights.sum(-1, keepdims=True)
  path = plots.plot_attention(weights, tmp_path / 'att.png',
                              query_tokens=list('abcde'),
                              key_tokens=list('abcdefg'), title='layer 0')
  assert_png(path, min_kb=10)
  single = plots.plot_attention(weights[0], tmp_path / 'att1.png')
  assert_png(single)
  # 6 heads lay out as 4 columns by 2 rows of 3-inch panels.
  assert png_size(path)[0] > 3 * png_size(single)[0]
  with pytest.raises(ValueError, match='key_tokens'):
    plots.plot_attention(weights, tmp_path / 'x.png', key_tokens=list('ab'))


def test_no_pyplot_state_or_backend_change(tmp_path):
  backend = matplotlib.get_backend()
  for i in range(10):
    plots.plot_confusion_matrix(np.eye(2), tmp_path / f'{i}.png')
  assert plt.get_fignums() == []
  assert matplotlib.get_backend() == backend
