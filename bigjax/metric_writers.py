"""Where metrics go: JSONL and TensorBoard files in the workdir, and the console.

Records are flat dicts with namespaced keys (`train/loss`, `eval/accuracy`);
only process 0 writes. `metrics.jsonl` is append-only: a resumed run appends
after what is there, and `read_history` keeps, for each step, the record
written last, so steps replayed after a resume replace the stale ones.
"""

import json
import os
import sys
import time

import jax
import numpy as np

METRICS_FILE = 'metrics.jsonl'


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else None


class MetricWriter:
  """Writes scalar metric records to metrics.jsonl and TensorBoard events."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    self._path = os.path.join(workdir, METRICS_FILE)
    self._tb = None
    if self._active:
      # Imported here so processes other than 0 never open event files.
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict) -> None:
    """Writes the scalar entries of `metrics` at `step`; arrays are skipped."""
    if not self._active:
      return
    scalars = {k: s for k, v in metrics.items() if (s := _scalar(v)) is not None}
    with open(self._path, 'a') as f:
      f.write(json.dumps({'step': int(step), **scalars}) + '\n')
    for k, v in scalars.items():
      self._tb.add_scalar(k, v, int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_history(workdir: str, *, up_to_step: int | None = None) -> list[dict]:
  """The records of metrics.jsonl, merged per step, in step order.

  Args:
    workdir: the run's directory.
    up_to_step: drop records after this step (those a crashed run wrote past
      the checkpoint it is resumed from).
  """
  path = os.path.join(workdir, METRICS_FILE)
  by_step = {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:
          continue  # A line cut short by a kill; the rest is still good.
        step = record['step']
        if up_to_step is None or step <= up_to_step:
          by_step.setdefault(step, {}).update(record)
  return [by_step[s] for s in sorted(by_step)]


def write_atomic(path: str, text: str) -> None:
  """Writes `text` through a temporary file and a rename, so a reader (or a
  rerun after a kill) sees the old file or the whole new one."""
  temporary = f'{path}.tmp'
  with open(temporary, 'w') as f:
    f.write(text)
  os.replace(temporary, path)


def write_json_atomic(path: str, value) -> None:
  """`write_atomic` of `value` as indented JSON."""
  write_atomic(path, json.dumps(value, indent=2, sort_keys=True))


class ProgressBar:
  """Step, loss, examples/s and ETA on one console line.

  Redrawn in place on a terminal; a plain line per update otherwise (logs of
  batch jobs). Only process 0 prints.
  """

  def __init__(self, total_steps: int, initial_step: int, *, enabled=True,
               stream=None):
    self._total = total_steps
    self._stream = stream or sys.stderr
    self._enabled = enabled and jax.process_index() == 0
    self._tty = self._stream.isatty()
    self._last = (initial_step, time.perf_counter())

  def update(self, step: int, *, loss: float, examples_per_sec: float) -> None:
    if not self._enabled:
      return
    prev_step, prev_time = self._last
    now = time.perf_counter()
    steps_per_sec = (step - prev_step) / max(now - prev_time, 1e-9)
    self._last = (step, now)
    eta = (self._total - step) / max(steps_per_sec, 1e-9)
    frac = step / self._total
    bar = '#' * int(30 * frac) + '-' * (30 - int(30 * frac))
    line = (f'[{bar}] {step}/{self._total} loss {loss:.4f} '
            f'{examples_per_sec:,.0f} ex/s ETA {_hms(eta)}')
    end = '' if self._tty else '\n'
    self._stream.write(('\r' if self._tty else '') + line + end)
    self._stream.flush()

  def close(self) -> None:
    if self._enabled and self._tty:
      self._stream.write('\n')


def _hms(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'
