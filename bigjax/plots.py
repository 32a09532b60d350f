"""PNG plots of training curves, predictions, confusion matrices, attention,
and of results across runs (bars and lines with error bars).

Every function builds a `matplotlib.figure.Figure` and renders it with the Agg
canvas directly instead of going through pyplot. That leaves the global
backend alone (a user in a notebook keeps theirs, a headless job needs no
display) and keeps figures out of pyplot's registry, so nothing has to be
closed and hundreds of calls in a training loop leak nothing. Each function
writes one PNG, creating parent directories, and returns its path as a str.
"""

from collections.abc import Mapping, Sequence
import math
import numbers
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from bigjax import metrics

_DPI = 100
# Above this many classes, per-cell text, and above this many classes or
# tokens, tick labels overlap into an unreadable smear, so they are left out.
_MAX_ANNOTATED_CLASSES = 30
_MAX_TICK_LABELS = 64


def plot_curves(history: Sequence[Mapping], path, *, title=None) -> str:
  """Plots losses, accuracies and the learning rate against the step.

  One panel per group that has data: every key ending in '/loss' (train and
  eval on one axes), every key ending in 'accuracy', and
  'train/learning_rate'. Other keys are ignored. The loss axis is
  logarithmic when all losses are positive and span more than a factor of 10,
  since early steps would otherwise flatten the rest of the curve.

  Args:
    history: metric records as in a run's metrics.jsonl, each a flat dict
      with 'step' and namespaced keys ('train/loss', 'eval/accuracy', ...).
      A record may hold any subset of keys; records without 'step' and
      non-numeric values are skipped.
    path: where to write the PNG.
    title: optional figure title.

  Returns:
    `path` as a str.
  """
  groups = _curve_groups(history)
  fig = Figure(figsize=(5 * max(len(groups), 1), 4), layout='constrained')
  if not groups:
    # An empty run (e.g. plotted before the first log) still gets a file, so
    # a caller polling for it does not have to special-case step 0.
    fig.text(0.5, 0.5, 'no metrics to plot', ha='center', va='center')
  axes = fig.subplots(1, len(groups), squeeze=False)[0] if groups else []
  for ax, (group, series) in zip(axes, groups.items()):
    for key, (steps, values) in sorted(series.items()):
      # Markers make sparse series such as periodic evals visible as points.
      marker = 'o' if len(steps) <= 50 else None
      ax.plot(steps, values, label=key, marker=marker, markersize=3)
    if group == 'loss':
      values = np.concatenate([v for _, v in series.values()])
      values = values[np.isfinite(values)]
      if values.size and values.min() > 0 and values.max() > 10 * values.min():
        ax.set_yscale('log')
    ax.set_title(group)
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize='small')
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_predictions(images, labels, predictions, path, *, class_names=None,
                     num=25) -> str:
  """Plots a grid of images titled 'pred (true)', red if wrong, green if right.

  Args:
    images: float [N, H, W, C] with C = 1 (grey) or 3 (RGB), or [N, H, W]
      grey, in any range: each image is rescaled to [0, 1] on its own, so
      normalised inputs display as they would before normalisation (up to
      contrast).
    labels: int [N], the true classes.
    predictions: int [N], the predicted classes.
    path: where to write the PNG.
    class_names: optional names indexed by class id; ids are shown otherwise.
    num: how many of the first images to show, in a near-square grid.

  Returns:
    `path` as a str.
  """
  images = np.asarray(images, dtype=np.float32)
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'images must be [N, H, W, 1 or 3], got {images.shape}.')
  labels = np.asarray(labels).reshape(-1)
  predictions = np.asarray(predictions).reshape(-1)
  n = min(num, len(images), len(labels), len(predictions))
  cols = max(1, math.ceil(math.sqrt(n)))
  rows = max(1, math.ceil(n / cols))
  name = lambda c: str(class_names[c]) if class_names is not None else str(c)

  fig = Figure(figsize=(1.8 * cols, 1.9 * rows), layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False).reshape(-1)
  for i, ax in enumerate(axes):
    ax.axis('off')
    if i >= n:
      continue
    image = _rescale_for_display(images[i])
    if image.shape[-1] == 1:
      ax.imshow(image[..., 0], cmap='gray', vmin=0, vmax=1)
    else:
      ax.imshow(image)
    right = predictions[i] == labels[i]
    ax.set_title(f'{name(predictions[i])} ({name(labels[i])})', fontsize=9,
                 color='green' if right else 'red')
  return _save(fig, path)


def plot_confusion_matrix(confusion, path, *, class_names=None,
                          normalize=True) -> str:
  """Plots a confusion matrix as a heatmap with the values in the cells.

  Args:
    confusion: [C, C] counts, rows = true class, columns = predicted class
      (as from `bigjax.metrics.confusion_matrix`).
    path: where to write the PNG.
    class_names: optional C names for the axes; class ids otherwise.
    normalize: if True, show each row divided by its sum (the recall of each
      class sits on the diagonal; an empty row stays 0); else raw counts.
      Cell text is left out above 30 classes and names above 64, where they
      cannot be read.

  Returns:
    `path` as a str.
  """
  confusion, class_names = metrics.checked_confusion(confusion, class_names)
  num_classes = confusion.shape[0]
  values = _row_normalize(confusion) if normalize else confusion

  # Cells of about half an inch keep two-digit rates legible at any C.
  side = min(max(4.0, 0.5 * num_classes + 2.5), 30.0)
  fig = Figure(figsize=(side + 1, side), layout='constrained')
  ax = fig.subplots()
  vmax = 1.0 if normalize else max(values.max(), 1.0)
  im = ax.imshow(values, cmap='Blues', vmin=0, vmax=vmax)
  fig.colorbar(im, ax=ax, shrink=0.8)
  if num_classes <= _MAX_ANNOTATED_CLASSES:
    for (t, p), value in np.ndenumerate(values):
      text = f'{value:.2f}' if normalize else f'{int(round(value))}'
      # White on dark cells, black on light ones.
      color = 'white' if value > 0.6 * vmax else 'black'
      ax.text(p, t, text, ha='center', va='center', color=color, fontsize=9)
  if num_classes <= _MAX_TICK_LABELS:
    ax.set_xticks(range(num_classes), class_names, rotation=45, ha='right',
                  rotation_mode='anchor')
    ax.set_yticks(range(num_classes), class_names)
  ax.set_xlabel('predicted')
  ax.set_ylabel('true')
  ax.set_title('confusion (row-normalised)' if normalize else 'confusion')
  return _save(fig, path)


def plot_attention(weights, path, *, query_tokens=None, key_tokens=None,
                   title=None) -> str:
  """Plots attention weights, one heatmap per head.

  All heads share one colour scale, from 0 to the largest weight, so their
  panels can be compared directly.

  Args:
    weights: float [heads, q_len, k_len] or [q_len, k_len], e.g. softmax
      probabilities for one example.
    path: where to write the PNG.
    query_tokens: optional q_len strings labelling the rows.
    key_tokens: optional k_len strings labelling the columns. Token labels are
      left out above 64 tokens, where they cannot be read.
    title: optional figure title.

  Returns:
    `path` as a str.
  """
  weights = np.asarray(weights, dtype=np.float32)
  if weights.ndim == 2:
    weights = weights[None]
  if weights.ndim != 3:
    raise ValueError(f'weights must be [heads, q, k] or [q, k], got '
                     f'{weights.shape}.')
  num_heads, q_len, k_len = weights.shape
  for tokens, length, what in ((query_tokens, q_len, 'query_tokens'),
                               (key_tokens, k_len, 'key_tokens')):
    if tokens is not None and len(tokens) != length:
      raise ValueError(f'{what} has {len(tokens)} entries, weights {length}.')

  cols = min(num_heads, 4)
  rows = math.ceil(num_heads / cols)
  # Panels grow with the sequence so that labelled tokens keep their room.
  labelled = query_tokens is not None or key_tokens is not None
  panel = min(max(3.0, 0.22 * max(q_len, k_len) if labelled else 3.0), 12.0)
  fig = Figure(figsize=(panel * cols + 1, panel * rows + 0.5),
               layout='constrained')
  axes = fig.subplots(rows, cols, squeeze=False)
  vmax = max(float(np.nanmax(weights)), 1e-9)
  for h, ax in enumerate(axes.reshape(-1)):
    if h >= num_heads:
      ax.axis('off')
      continue
    col = h % cols
    im = ax.imshow(weights[h], cmap='viridis', vmin=0, vmax=vmax,
                   aspect='auto', interpolation='nearest')
    if num_heads > 1:
      ax.set_title(f'head {h}')
    _label_tokens(ax, key_tokens, query_tokens)
    # Axis names once per row and column; the tokens stay on every panel.
    if h + cols >= num_heads:
      ax.set_xlabel('key')
    if col == 0:
      ax.set_ylabel('query')
  fig.colorbar(im, ax=axes, shrink=0.8)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def plot_bars(names: Sequence[str], means, errors, path, *, ylabel: str,
              title=None, highlight=None) -> str:
  """One bar per entry with an error bar, e.g. an ablation's cells.

  Args:
    names: the bars' labels, left to right.
    means, errors: [len(names)] bar heights and error-bar half-widths (e.g.
      95% intervals over seeds; 0 draws none).
    path: where to write the PNG.
    ylabel: what the bars measure.
    title: optional figure title.
    highlight: the name of a bar drawn in another colour (e.g. the baseline).

  Returns:
    `path` as a str.
  """
  fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 4.5),
               layout='constrained')
  ax = fig.subplots()
  colors = ['tab:orange' if n == highlight else 'tab:blue' for n in names]
  ax.bar(range(len(names)), means, yerr=errors, color=colors, capsize=4)
  ax.set_xticks(range(len(names)), names, rotation=30, ha='right',
                fontsize='small')
  ax.set_ylabel(ylabel)
  # Bars start at 0, which would flatten differences between nearby means
  # (e.g. accuracies of 0.91 and 0.92): show the range that holds the data.
  low = np.asarray(means, np.float64) - np.asarray(errors, np.float64)
  high = np.asarray(means, np.float64) + np.asarray(errors, np.float64)
  if len(names) and np.all(np.isfinite(low)) and np.all(np.isfinite(high)):
    pad = 0.15 * max(float(high.max() - low.min()), 1e-12)
    ax.set_ylim(float(low.min()) - pad, float(high.max()) + pad)
  ax.grid(True, axis='y', alpha=0.3)
  if title:
    ax.set_title(title)
  return _save(fig, path)


def plot_series(series: Mapping[str, tuple], path, *, xlabel: str,
                ylabel: str, title=None, log_x: bool = False) -> str:
  """Lines of points with error bars, one line per series.

  Args:
    series: {line label: (x [n], means [n], errors [n])}; each line is drawn
      in order of x.
    path: where to write the PNG.
    xlabel, ylabel: the axes' labels.
    title: optional figure title.
    log_x: a logarithmic x axis.

  Returns:
    `path` as a str.
  """
  fig = Figure(figsize=(6, 4.5), layout='constrained')
  ax = fig.subplots()
  for label, (x, means, errors) in series.items():
    order = np.argsort(np.asarray(x, np.float64), kind='stable')
    ax.errorbar(np.asarray(x, np.float64)[order],
                np.asarray(means, np.float64)[order],
                yerr=np.asarray(errors, np.float64)[order], label=label,
                marker='o', capsize=3)
  if log_x:
    ax.set_xscale('log')
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(True, alpha=0.3)
  if series:
    ax.legend(fontsize='small')
  if title:
    ax.set_title(title)
  return _save(fig, path)


def _curve_groups(history):
  """Splits metric records into plot groups.

  Returns:
    {group: {key: (steps, values)}} with group in ('loss', 'accuracy',
    'learning rate') in that order, only groups with data, each series sorted
    by step as float64 arrays.
  """
  def group_of(key):
    if key.endswith('/loss'):
      return 'loss'
    if key.endswith('accuracy'):
      return 'accuracy'
    if key == 'train/learning_rate':
      return 'learning rate'
    return None

  points = {}
  for record in history:
    if 'step' not in record:
      continue
    for key, value in record.items():
      # bool is a numbers.Number too, but never a curve worth drawing.
      if (group_of(key) is None or isinstance(value, bool)
          or not isinstance(value, numbers.Real)):
        continue
      points.setdefault(key, []).append((record['step'], float(value)))

  groups = {}
  for group in ('loss', 'accuracy', 'learning rate'):
    for key in points:
      if group_of(key) == group:
        steps, values = np.array(sorted(points[key]), dtype=np.float64).T
        groups.setdefault(group, {})[key] = (steps, values)
  return groups


def _rescale_for_display(image):
  """Maps one [H, W, C] image linearly onto [0, 1]; constant images go to 0."""
  image = np.nan_to_num(np.asarray(image, dtype=np.float32))
  low, high = image.min(), image.max()
  if high == low:
    return np.zeros_like(image)
  return (image - low) / (high - low)


def _row_normalize(confusion):
  """Divides each row by its sum, so a row holds that class's rates; 0 rows stay 0."""
  sums = confusion.sum(axis=1, keepdims=True)
  return np.divide(confusion, sums, out=np.zeros_like(confusion),
                   where=sums != 0)


def _label_tokens(ax, key_tokens, query_tokens):
  """Puts token strings on the axes, or leaves ticks alone if too many."""
  if key_tokens is not None and len(key_tokens) <= _MAX_TICK_LABELS:
    ax.set_xticks(range(len(key_tokens)), [str(t) for t in key_tokens],
                  rotation=90, fontsize=8)
  if query_tokens is not None and len(query_tokens) <= _MAX_TICK_LABELS:
    ax.set_yticks(range(len(query_tokens)), [str(t) for t in query_tokens],
                  fontsize=8)


def _save(fig, path):
  """Renders `fig` to a PNG at `path` with the Agg canvas; returns the path."""
  path = os.fspath(path)
  parent = os.path.dirname(path)
  if parent:
    os.makedirs(parent, exist_ok=True)
  FigureCanvasAgg(fig)  # Attaches itself to fig; savefig then uses Agg.
  fig.savefig(path, dpi=_DPI, format='png')
  # Nothing else references fig (pyplot never saw it); clearing breaks the
  # artist cycles now rather than at the next garbage collection.
  fig.clear()
  return path
