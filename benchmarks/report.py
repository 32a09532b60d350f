"""What every benchmark shares: fresh workdirs, loading configs, and the
report (one JSON line per record, a Markdown table, optionally all records as
one JSON file)."""

import importlib.util
import json
import math
import os
import shutil

# Marks a workdir a benchmark created, so only those are ever deleted.
MARKER = '.benchmark_workdir'


def fresh_workdir(path: str) -> str:
  """An empty workdir; only ever deletes one a benchmark created."""
  if os.path.exists(path):
    if not os.path.exists(os.path.join(path, MARKER)):
      raise SystemExit(f'{path} exists and is not a benchmark workdir; '
                       'pass another --root')
    shutil.rmtree(path)
  os.makedirs(path)
  open(os.path.join(path, MARKER), 'w').close()
  return path


def load_config(path: str):
  """Loads a config file the way --config does: FILE[:VARIANT]."""
  file, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('benchmarked_config', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


# Two-sided 97.5% quantiles of Student's t for 1..10 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def mean_and_ci95(values) -> tuple[float, float]:
  """The mean and the half-width of its 95% t-interval (0 for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, 0.0
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
  t = _T975[n - 2] if n - 1 <= len(_T975) else 1.96
  return mean, t * std / math.sqrt(n)


def write(records, columns, *, json_path=None, title=None):
  """Prints `records` as a table of `columns` and writes them to `json_path`.

  Args:
    records: a list of flat dicts.
    columns: (header, format function of a record) pairs, in table order.
    json_path: where to write the list of records as JSON, if given.
    title: a line printed above the table.
  """
  if title:
    print(f'\n{title}')
  print('\n| ' + ' | '.join(h for h, _ in columns) + ' |')
  print('|' + '---|' * len(columns))
  for r in records:
    print('| ' + ' | '.join(fmt(r) for _, fmt in columns) + ' |')
  if json_path:
    with open(json_path, 'w') as f:
      json.dump(records, f, indent=2)
