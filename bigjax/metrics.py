"""Classification metrics: a jittable confusion matrix and a report from it.

The split is deliberate. `confusion_matrix` runs inside the jitted eval step,
so only a small [num_classes, num_classes] integer array leaves the device per
batch and batches are combined by adding. `classification_report` runs once
per evaluation on the host, in float64 NumPy, where ratios of large counts
lose nothing to float32.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def confusion_matrix(labels, predictions, num_classes, mask=None) -> jax.Array:
  """Counts (true class, predicted class) pairs.

  Pure `jnp` and shape-static, so it can live inside a jitted step; pass
  `num_classes` as a static argument. Entries with a label or prediction
  outside [0, num_classes) are not counted (padding is often labelled -1),
  rather than being clipped into a real class.

  Args:
    labels: int [...], the true class of each example, e.g. [batch] or
      [batch, length] for per-token classification.
    predictions: int [...], same shape as `labels`: the predicted class
      (take `argmax` of the logits first).
    num_classes: Python int, the number of classes.
    mask: optional bool or float [...], same shape as `labels`. Entries
      where it is zero (or False) are not counted, e.g. padded examples of
      the last batch. Any nonzero value counts the example once.

  Returns:
    int32 [num_classes, num_classes]; entry [t, p] is the number of counted
    examples of true class t predicted as p. Rows sum to the class supports.
  """
  # int32 first, so that neither the range checks nor the bin index below can
  # overflow a narrow dtype such as uint8 labels.
  labels = jnp.asarray(labels).astype(jnp.int32)
  predictions = jnp.asarray(predictions).astype(jnp.int32)
  if labels.shape != predictions.shape:
    raise ValueError(f'labels and predictions differ in shape: '
                     f'{labels.shape} vs {predictions.shape}.')
  valid = ((labels >= 0) & (labels < num_classes)
           & (predictions >= 0) & (predictions < num_classes))
  if mask is not None:
    mask = jnp.asarray(mask)
    if mask.shape != labels.shape:
      raise ValueError(f'mask shape {mask.shape} differs from labels shape '
                       f'{labels.shape}.')
    valid &= mask != 0
  # One flat bin per (true, predicted) pair. Invalid entries go to bin 0 with
  # weight 0, so no out-of-range index ever reaches the scatter.
  bins = jnp.where(valid, labels * num_classes + predictions, 0)
  counts = jax.ops.segment_sum(
      valid.astype(jnp.int32).reshape(-1), bins.reshape(-1),
      num_segments=num_classes * num_classes)
  return counts.reshape(num_classes, num_classes)


def checked_confusion(confusion, class_names=None):
  """`confusion` as float64 [C, C] and its C unique class names.

  Raises ValueError for a non-square matrix or names that do not fit; names
  default to '0', '1', ...
  """
  confusion = np.asarray(confusion, dtype=np.float64)
  if confusion.ndim != 2 or confusion.shape[0] != confusion.shape[1]:
    raise ValueError(f'confusion must be square [C, C], got {confusion.shape}.')
  num_classes = confusion.shape[0]
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  if len(class_names) != num_classes or len(set(class_names)) != num_classes:
    raise ValueError(f'Need {num_classes} unique class names, got '
                     f'{list(class_names)}.')
  return confusion, list(class_names)


def classification_report(
    confusion: np.ndarray,
    class_names: Sequence[str] | None = None,
) -> dict[str, float]:
  """Accuracy, precision, recall and F1 from a confusion matrix.

  Zero-division convention, the same as scikit-learn's `zero_division=0`: a
  class that is never predicted has precision 0, a class that never occurs has
  recall 0, and F1 is 0 when precision + recall is 0. Accuracy of an empty
  matrix is 0. Macro averages are the unweighted mean over ALL rows of the
  matrix, including classes absent from both labels and predictions (as
  scikit-learn does when given `labels=range(num_classes)`; without `labels`
  it averages only over classes that appear, which gives a different number).

  Args:
    confusion: int or float [num_classes, num_classes], rows = true class,
      columns = predicted class, as returned by `confusion_matrix` (summed
      over batches).
    class_names: optional num_classes unique names used in the per-class keys;
      defaults to '0', '1', ...

  Returns:
    A flat dict of Python floats with keys `accuracy`, `macro_precision`,
    `macro_recall`, `macro_f1`, `num_examples`, and for each class name n
    `precision/n`, `recall/n` and `f1/n`.
  """
  confusion, class_names = checked_confusion(confusion, class_names)
  true_positives = np.diag(confusion)
  support = confusion.sum(axis=1)  # How often each class occurs.
  predicted = confusion.sum(axis=0)  # How often each class is predicted.
  total = confusion.sum()
  precision = _safe_divide(true_positives, predicted)
  recall = _safe_divide(true_positives, support)
  f1 = _safe_divide(2 * precision * recall, precision + recall)

  report = {
      'accuracy': float(_safe_divide(true_positives.sum(), total)),
      'macro_precision': float(precision.mean()),
      'macro_recall': float(recall.mean()),
      'macro_f1': float(f1.mean()),
      'num_examples': float(total),
  }
  for i, name in enumerate(class_names):
    report[f'precision/{name}'] = float(precision[i])
    report[f'recall/{name}'] = float(recall[i])
    report[f'f1/{name}'] = float(f1[i])
  return report


def _safe_divide(numerator, denominator):
  """numerator / denominator elementwise, 0 where the denominator is 0."""
  numerator = np.asarray(numerator, dtype=np.float64)
  denominator = np.asarray(denominator, dtype=np.float64)
  safe = np.where(denominator == 0, 1.0, denominator)
  return np.where(denominator == 0, 0.0, numerator / safe)
