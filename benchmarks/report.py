"""What every benchmark shares: fresh workdirs, loading configs, and the
report (one JSON line per record, a Markdown table, optionally all records as
one JSON file)."""

import json
import os
import shutil

# Shared with the ablation driver; benchmarks call them as report.NAME.
from bigjax.config_files import load_config  # noqa: F401
from bigjax.stats import mean_and_ci95  # noqa: F401

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
