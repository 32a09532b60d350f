"""How every benchmark reports: one JSON line per record, a Markdown table,
and optionally all records as one JSON file."""

import json


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
