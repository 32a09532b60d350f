"""The report of an ablation: results.json, results.md and plots/.

Built from the cells' summaries (their cell.json files, `bigjax/ablation.py`)
and rewritten whenever a cell finishes, so a partial ablation shows what it
has; unfinished cells are listed as pending. Per cell and metric: the mean
over seeds with its 95% t-interval, and, against the baseline cell on the
same seeds, the mean paired difference and the paired t-test's p-value
(`bigjax/stats.py`).
"""

import json
import math
import os
import re

from bigjax import metric_writers
from bigjax import plots
from bigjax import stats
from bigjax.errors import UserError

# Cell properties `plot.x` may name besides a numeric axis key.
PLOT_X = ('unique_parameters', 'effective_parameters', 'flops_per_example',
          'steps', 'flops_per_seed')
RESULTS_JSON = 'results.json'
RESULTS_MD = 'results.md'
PLOTS_DIR = 'plots'


def config_json(ablation) -> dict:
  """The ablation config as JSON values (tuples become lists)."""
  return json.loads(ablation.to_json_best_effort(sort_keys=True))


def _metric_entry(key, values: dict, baseline_values):
  """{'values' per seed, 'mean', 'ci95', 'n'[, 'vs_baseline']} of one metric."""
  mean, ci95 = stats.mean_and_ci95(list(values.values()))
  entry = {'values': values, 'mean': mean, 'ci95': ci95, 'n': len(values)}
  if baseline_values is not None:
    common = sorted(set(values) & set(baseline_values), key=int)
    if common:
      entry['vs_baseline'] = stats.paired_comparison(
          [values[s] for s in common], [baseline_values[s] for s in common])
  return entry


def _seed_values(summary, key) -> dict[str, float]:
  """{seed: final value of `key`}; UserError if a seed's metrics lack it."""
  out = {}
  for seed, final in summary['final_metrics'].items():
    if key not in final:
      raise UserError(
          f"config.metrics names '{key}', which cell '{summary['name']}' "
          f'does not report (its final metrics: '
          f'{", ".join(sorted(final))}); fix config.metrics and rerun: '
          'finished cells are kept')
    out[seed] = float(final[key])
  return out


def build(ablation, cells, summaries: dict) -> dict:
  """The report as a dict (what results.json holds).

  Args:
    ablation: the ablation config.
    cells: every `ablation.Cell`, in order.
    summaries: {cell name: its cell.json} for the finished cells.
  """
  baseline = ablation.baseline or cells[0].name
  rows = []
  for cell in cells:
    steps, batch = cell.config.num_train_steps, cell.config.batch_size
    flops = cell.flops_per_step  # None until traced (see ablation.Cell).
    row = {'name': cell.name, 'labels': cell.labels,
           'settings': cell.settings, 'parameters': cell.parameters,
           'finished': cell.name in summaries,
           # As planned; a finished cell's own summary replaces them below.
           'steps': steps, 'batch_size': batch, 'flops_per_step': flops,
           'flops_per_example': flops and flops / batch,
           'flops_per_seed': flops and flops * steps}
    summary = summaries.get(cell.name)
    if summary is not None:
      row.update({k: summary[k] for k in (
          'steps', 'batch_size', 'flops_per_step', 'flops_per_example',
          'flops_per_seed', 'wall_s', 'examples_per_sec', 'seeds')})
      row['metrics'] = {}
      for key, _ in ablation.metrics:
        base = (_seed_values(summaries[baseline], key)
                if baseline in summaries and cell.name != baseline else None)
        row['metrics'][key] = _metric_entry(
            key, _seed_values(summary, key), base)
    rows.append(row)
  return {
      'ablation': config_json(ablation),
      'baseline': baseline,
      'metrics': [{'key': k, 'direction': d} for k, d in ablation.metrics],
      'finished_cells': sum(r['finished'] for r in rows),
      'cells': rows,
  }


def write(workdir: str, ablation, cells, summaries: dict) -> dict:
  """Writes results.json, results.md and plots/ in `workdir`; returns the
  report (`build`)."""
  report = build(ablation, cells, summaries)
  metric_writers.write_json_atomic(os.path.join(workdir, RESULTS_JSON), report)
  metric_writers.write_atomic(os.path.join(workdir, RESULTS_MD),
                              markdown(report))
  if report['finished_cells']:
    write_plots(os.path.join(workdir, PLOTS_DIR), ablation, report)
  return report


# ---- results.md --------------------------------------------------------------


def _number(x: float) -> str:
  """4 significant digits, thousands separated; 'nan' stays readable."""
  if not math.isfinite(x):
    return 'n/a'
  return f'{x:,.4g}' if abs(x) < 1e4 else f'{x:,.0f}'


def _mflops(flops) -> str:
  return '' if flops is None else f'{flops / 1e6:,.2f}'


def _p_value(p: float) -> str:
  if not math.isfinite(p):
    return 'n/a'
  return '< 0.001' if p < 0.001 else f'{p:.3f}'


def _best(report, key, direction):
  means = {r['name']: r['metrics'][key]['mean']
           for r in report['cells'] if r['finished']}
  pick = max if direction == 'higher' else min
  return pick(means, key=means.get) if means else None


def markdown(report) -> str:
  """A Markdown table: one row per cell, three columns per metric."""
  axes = list(report['cells'][0]['labels'])
  metrics = report['metrics']
  header = (['cell'] + axes + ['unique params', 'effective params',
                               'MFLOPs/example', 'steps', 'wall (min)',
                               'examples/s'])
  for m in metrics:
    arrow = '↑' if m['direction'] == 'higher' else '↓'
    header += [f"{m['key']} {arrow}", 'Δ vs baseline', 'p']
  best = {m['key']: _best(report, m['key'], m['direction']) for m in metrics}
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for row in report['cells']:
    name = row['name'] + (' (baseline)' if row['name'] == report['baseline']
                          else '')
    cells = ([f'`{name}`'] + [row['labels'][a] for a in axes]
             + [f"{row['parameters']['unique']:,}",
                f"{row['parameters']['effective']:,}",
                _mflops(row['flops_per_example']),
                f"{row['steps']:,}"])
    if not row['finished']:
      cells += ['pending'] + [''] * (len(header) - len(cells) - 1)
      lines.append('| ' + ' | '.join(cells) + ' |')
      continue
    cells += [f"{row['wall_s'] / 60:.1f}", f"{row['examples_per_sec']:,.0f}"]
    for m in metrics:
      entry = row['metrics'][m['key']]
      text = f"{_number(entry['mean'])} ± {_number(entry['ci95'])}"
      if best[m['key']] == row['name']:
        text = f'**{text}**'
      versus = entry.get('vs_baseline')
      if versus is None:
        cells += [text, '—', '—']
      else:
        cells += [text, f"{versus['mean_difference']:+.4g}",
                  _p_value(versus['p_value'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  config = report['ablation']
  seeds = config['num_seeds']
  budget = config['budget']
  intro = [
      f"# Ablation: {report['finished_cells']} of {len(report['cells'])} "
      'cells finished',
      '',
      f"Base config `{config['base_config'] or 'per cell'}`; {seeds} seed(s) "
      f"per cell from seed {config['first_seed']}; budget {budget['value']:g} "
      f"{budget['kind']} per seed; baseline `{report['baseline']}`.",
      '',
      'Each metric: mean ± half-width of the 95% t-interval over seeds '
      '(bold: the best mean). Δ: mean difference to the baseline on the same '
      'seeds; p: two-sided paired t-test. FLOPs: the matrix products of a '
      'training step (forward and backward), per example. Wall time covers '
      'all seeds, compilation and evaluation included; examples/s counts '
      'all seeds.',
      '',
  ]
  return '\n'.join(intro + lines) + '\n'


# ---- plots/ ------------------------------------------------------------------


def _slug(text: str) -> str:
  return re.sub(r'[^A-Za-z0-9]+', '_', text).strip('_')


def _x_value(row, x: str) -> float:
  """The value of `plot.x` for a finished row of the report."""
  if x in ('unique_parameters', 'effective_parameters'):
    return row['parameters'][x.split('_')[0]]
  if x in PLOT_X:
    return row[x]
  return row['settings'][x]


def _groups(ablation, axes) -> list[str]:
  """The axes whose labels tell the lines apart (see configs/ablations)."""
  if ablation.plot.group_by:
    return list(ablation.plot.group_by)
  setting_x = {a['name'] for a in ablation.axes if ablation.plot.x in a['keys']}
  return [a for a in axes if a not in setting_x]


def write_plots(directory: str, ablation, report) -> None:
  """Per metric: bars per cell, and the metric against `plot.x` (if set),
  one line per group of cells."""
  rows = [r for r in report['cells'] if r['finished']]
  axes = list(rows[0]['labels'])
  groups = _groups(ablation, axes)
  x = ablation.plot.x
  for m in report['metrics']:
    key = m['key']
    ylabel = f"{key} ({m['direction']} is better)"
    means = [r['metrics'][key]['mean'] for r in rows]
    errors = [r['metrics'][key]['ci95'] for r in rows]
    plots.plot_bars([r['name'] for r in rows], means, errors,
                    os.path.join(directory, f'bars_{_slug(key)}.png'),
                    ylabel=ylabel, highlight=report['baseline'],
                    title='mean and 95% interval over seeds')
    if not x:
      continue
    series = {}
    for r, mean, error in zip(rows, means, errors):
      label = ', '.join(f'{a}={r["labels"][a]}' for a in groups) or 'cells'
      points = series.setdefault(label, ([], [], []))
      for values, value in zip(points, (_x_value(r, x), mean, error)):
        values.append(value)
    plots.plot_series(
        series, os.path.join(directory, f'{_slug(key)}_vs_{_slug(x)}.png'),
        xlabel=x.replace('_', ' '), ylabel=ylabel, log_x=ablation.plot.log_x,
        title='mean and 95% interval over seeds')
