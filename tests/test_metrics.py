"""Tests for bigjax.metrics against hand-computed numbers and a loop reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigjax import metrics

# 3 classes, 10 examples. By hand, rows = true, columns = predicted:
#   true 0: predicted 0, 0, 1     -> [2, 1, 0]
#   true 1: predicted 1, 1, 0     -> [1, 2, 0]
#   true 2: predicted 2, 2, 1, 0  -> [1, 1, 2]
# Column sums (times predicted) are 4, 4, 2; row sums (supports) 3, 3, 4.
LABELS = [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
PREDICTIONS = [0, 0, 1, 1, 1, 0, 2, 2, 1, 0]
CONFUSION = [[2, 1, 0], [1, 2, 0], [1, 1, 2]]


def reference_confusion(labels, predictions, num_classes, mask=None):
  """Counts pairs one example at a time."""
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for i, (t, p) in enumerate(zip(labels, predictions)):
    if mask is None or mask[i]:
      confusion[t, p] += 1
  return confusion


def reference_report(confusion):
  """Per-class precision, recall, F1 with zero_division=0, by explicit loops."""
  num_classes = len(confusion)
  precision, recall, f1 = [], [], []
  for c in range(num_classes):
    tp = confusion[c][c]
    predicted = sum(confusion[t][c] for t in range(num_classes))
    present = sum(confusion[c][p] for p in range(num_classes))
    prec = tp / predicted if predicted else 0.0
    rec = tp / present if present else 0.0
    precision.append(prec)
    recall.append(rec)
    f1.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
  return precision, recall, f1


def test_confusion_matrix_hand_built_case():
  confusion = metrics.confusion_matrix(
      jnp.array(LABELS), jnp.array(PREDICTIONS), 3)
  assert confusion.dtype == jnp.int32
  np.testing.assert_array_equal(confusion, CONFUSION)


def test_classification_report_hand_built_case():
  report = metrics.classification_report(
      np.array(CONFUSION), class_names=['cat', 'dog', 'fox'])
  expected = {
      'accuracy': 6 / 10,
      'num_examples': 10.0,
      'precision/cat': 2 / 4, 'precision/dog': 2 / 4, 'precision/fox': 2 / 2,
      'recall/cat': 2 / 3, 'recall/dog': 2 / 3, 'recall/fox': 2 / 4,
      # F1 = 2PR / (P + R): 2 * 1/2 * 2/3 / (7/6) = 4/7; 2 * 1 * 1/2 / 1.5.
      'f1/cat': 4 / 7, 'f1/dog': 4 / 7, 'f1/fox': 2 / 3,
      'macro_precision': 2 / 3,
      'macro_recall': 11 / 18,
      'macro_f1': 38 / 63,
  }
  assert report.keys() == expected.keys()
  for key, value in expected.items():
    assert report[key] == pytest.approx(value, abs=1e-12), key
    assert isinstance(report[key], float), key


def test_default_class_names_are_indices():
  report = metrics.classification_report(np.array(CONFUSION))
  assert report['precision/2'] == 1.0
  assert report['recall/0'] == pytest.approx(2 / 3)


def test_random_case_with_absent_and_unpredicted_classes():
  rng = np.random.default_rng(0)
  num_classes = 5
  # Class 3 never occurs; class 2 is never predicted.
  labels = rng.choice([0, 1, 2, 4], size=200)
  predictions = rng.choice([0, 1, 3, 4], size=200)
  predictions[:80] = np.where(labels[:80] == 2, 0, labels[:80])

  confusion = np.asarray(metrics.confusion_matrix(labels, predictions,
                                                  num_classes))
  np.testing.assert_array_equal(
      confusion, reference_confusion(labels, predictions, num_classes))

  report = metrics.classification_report(confusion)
  precision, recall, f1 = reference_report(confusion)
  for c in range(num_classes):
    assert report[f'precision/{c}'] == pytest.approx(precision[c])
    assert report[f'recall/{c}'] == pytest.approx(recall[c])
    assert report[f'f1/{c}'] == pytest.approx(f1[c])
  # The zero-division cases themselves: never predicted, never present.
  assert report['precision/2'] == 0.0 and report['f1/2'] == 0.0
  assert report['recall/3'] == 0.0 and report['f1/3'] == 0.0
  assert report['precision/3'] == 0.0  # Predicted, but never correctly.
  assert report['recall/2'] == 0.0  # Present, but never predicted.
  # Macro averages include the two degenerate classes.
  assert report['macro_f1'] == pytest.approx(sum(f1) / num_classes)
  assert report['macro_recall'] == pytest.approx(sum(recall) / num_classes)
  assert report['accuracy'] == pytest.approx(
      np.mean(labels == predictions))
  assert report['num_examples'] == 200.0


def test_mask_excludes_examples():
  # Masking the last two examples (true 2 -> 1, true 2 -> 0) leaves row 2 as
  # [0, 0, 2]; the bool and float forms must agree.
  mask = np.array([1] * 8 + [0] * 2)
  expected = [[2, 1, 0], [1, 2, 0], [0, 0, 2]]
  for m in (mask.astype(bool), mask.astype(np.float32)):
    confusion = metrics.confusion_matrix(LABELS, PREDICTIONS, 3, mask=m)
    np.testing.assert_array_equal(confusion, expected)


def test_random_mask_matches_reference():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 4, size=64)
  predictions = rng.integers(0, 4, size=64)
  mask = rng.random(64) < 0.5
  confusion = metrics.confusion_matrix(labels, predictions, 4, mask=mask)
  np.testing.assert_array_equal(
      confusion, reference_confusion(labels, predictions, 4, mask))
  assert int(confusion.sum()) == int(mask.sum())


def test_out_of_range_entries_are_not_counted():
  # -1 is a common padding label; it must not land in class 0 or C-1.
  confusion = metrics.confusion_matrix(
      [0, -1, 1, 2, 1], [0, 0, 3, 2, 1], 3)
  np.testing.assert_array_equal(confusion, [[1, 0, 0], [0, 1, 0], [0, 0, 1]])


def test_confusion_matrix_under_jit_and_with_extra_dims():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 6, size=(4, 16))  # E.g. [batch, length] tokens.
  predictions = rng.integers(0, 6, size=(4, 16))
  mask = np.ones((4, 16), bool)
  mask[:, 12:] = False
  jitted = jax.jit(metrics.confusion_matrix, static_argnums=2)
  confusion = jitted(labels, predictions, 6, mask)
  assert confusion.shape == (6, 6) and confusion.dtype == jnp.int32
  np.testing.assert_array_equal(
      confusion,
      reference_confusion(labels.ravel(), predictions.ravel(), 6,
                          mask.ravel()))


def test_batches_add_up():
  # Eval loops sum per-batch matrices; that must equal one big matrix.
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 3, size=30)
  predictions = rng.integers(0, 3, size=30)
  whole = metrics.confusion_matrix(labels, predictions, 3)
  parts = sum(metrics.confusion_matrix(labels[i:i + 10],
                                       predictions[i:i + 10], 3)
              for i in range(0, 30, 10))
  np.testing.assert_array_equal(whole, parts)


def test_empty_confusion_gives_zeros():
  report = metrics.classification_report(np.zeros((2, 2), np.int32))
  assert all(value == 0.0 for value in report.values())
  assert len(report) == 5 + 3 * 2


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match='square'):
    metrics.classification_report(np.zeros((2, 3)))
  with pytest.raises(ValueError, match='unique class names'):
    metrics.classification_report(np.zeros((2, 2)), ['a', 'a'])
  with pytest.raises(ValueError, match='shape'):
    metrics.confusion_matrix([0, 1], [0, 1, 1], 2)
