"""Ablations: one experiment config varied along axes, trained over seeds.

`run_ablation(ablation, workdir)` (the loop behind `experiments/ablate.py`)
expands an ablation config (`configs/ablations/base.py` declares its keys)
into cells: the axes' zipped value lists, crossed. Every cell is an ordinary
run of `train.train_and_evaluate` per seed (or one vmapped program for all of
a cell's seeds), trained for the same budget, and the report
(`bigjax/ablation_report.py`) sets the cells side by side with seed
intervals and paired tests against a baseline cell.

Everything is checked before anything trains: the ablation's own keys, that
every cell's experiment config builds, and that WORKDIR holds no ablation of
another config. Then, in WORKDIR:

  ablation.json             the resolved ablation config and its cells;
  cells/CELL/seed_S/        seed S's run (its checkpoints, metrics.jsonl and
                            final_metrics.json);
  cells/CELL/cell.json      the cell's summary (parameters, FLOPs, steps,
                            wall time, every seed's final metrics), written
                            last and atomically: a cell is finished exactly
                            when it exists;
  results.json, results.md, plots/   the report, rewritten whenever a cell
                            finishes;
  xla_cache/                compiled programs, reused by the next seed and
                            by a rerun (`platform.compilation_cache`).

A rerun of the same command skips finished cells and resumes a half-trained
one from its checkpoints, so an ablation killed at any point finishes only
what is missing.
"""

import copy
import dataclasses
import difflib
import itertools
import json
import math
import numbers
import os
import re
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections

from bigjax import ablation_report
from bigjax import config_files
from bigjax import config_validation
from bigjax import flops
from bigjax import metric_writers
from bigjax import platform
from bigjax import train
from bigjax.errors import UserError

BUDGET_KINDS = ('steps', 'examples', 'epochs', 'flops')
DIRECTIONS = ('higher', 'lower')
# The axis key that switches the experiment config file.
BASE_CONFIG_KEY = 'base_config'
# Experiment keys the driver sets in every cell: seeds and training length.
_DRIVER_KEYS = ('seed', 'num_seeds', 'num_train_steps', 'num_epochs')
# Ablation keys that change only the report: a rerun may change them.
_REPORT_KEYS = ('baseline', 'metrics', 'plot')

ABLATION_FILE = 'ablation.json'
CELL_FILE = 'cell.json'
# Per seed, beside its run, once it finished (sequential mode): its time.
SEED_FILE = 'seed.json'
# Compiled programs, reused by the next seed and by a rerun; safe to delete.
COMPILATION_CACHE = 'xla_cache'


@dataclasses.dataclass(frozen=True)
class Cell:
  """One variant of the experiment, before it trains.

  Attributes:
    name: 'AXIS-LABEL__AXIS-LABEL', also its folder under WORKDIR/cells/.
    labels: {axis name: label}, in axis order.
    settings: {axis key: value} for this cell ('base_config' included).
    config: its experiment config for the first seed: overrides, settings
      and the budget (as num_train_steps) applied.
    parameters: {'unique': stored, 'effective': applied} parameter counts.
    flops_per_step: FLOPs of one training step of one seed
      (`train_step_flops`); traced when planning only for a 'flops' budget
      (None otherwise: each cell's trace costs a second or two), else just
      before the cell trains.
  """
  name: str
  labels: dict[str, str]
  settings: dict[str, Any]
  config: ml_collections.ConfigDict
  parameters: dict[str, int]
  flops_per_step: Optional[float] = None


# ---- Expanding and checking the ablation config ------------------------------


def _label_text(value) -> str:
  if isinstance(value, (tuple, list)):
    return 'x'.join(_label_text(v) for v in value)
  return str(value)


def _safe(label: str) -> str:
  """`label` with only letters, digits, '.', '_' and '-' (a folder name)."""
  return re.sub(r'[^A-Za-z0-9._-]', '_', label).lstrip('.') or '_'


def _check_axis(axis, index: int) -> tuple[str, list[str], list[tuple]]:
  """(name, labels, value rows) of one axis; UserError if it is malformed."""
  where = f'config.axes[{index}]'
  if not isinstance(axis, dict) or set(axis) != {'name', 'keys', 'values',
                                                  'labels'}:
    raise UserError(f'{where} must be a dict with name, keys, values and '
                    'labels; build it with configs/ablations/base.axis()')
  name, keys, values = axis['name'], tuple(axis['keys']), tuple(axis['values'])
  if not isinstance(name, str) or not re.fullmatch(r'[A-Za-z]\w*', name):
    raise UserError(f'{where}: name {name!r} must be a word (letters, digits, '
                    "'_'), e.g. 'sharing'")
  where = f"config.axes '{name}'"
  if not keys or len(values) != len(keys):
    raise UserError(f'{where} has {len(keys)} keys and {len(values)} value '
                    'lists: give one list of values per key (at least one)')
  lengths = {len(v) for v in values}
  if len(lengths) != 1 or 0 in lengths:
    raise UserError(f'{where}: the value lists of {", ".join(keys)} have '
                    f'lengths {[len(v) for v in values]}; zipped lists must '
                    'be equally long and not empty')
  rows = list(zip(*values))
  labels = list(axis['labels'])
  if not labels:
    if any(isinstance(v, dict) for row in rows for v in row):
      raise UserError(f'{where} sets whole subtrees (dict values): give it '
                      'labels, one per value')
    labels = ['_'.join(_label_text(v) for v in row) for row in rows]
  if len(labels) != len(rows):
    raise UserError(f'{where} has {len(labels)} labels for {len(rows)} '
                    'values; give one label per value, or none')
  safe = [_safe(str(l)) for l in labels]
  if len(set(safe)) != len(safe):
    raise UserError(f'{where}: labels {labels} are not unique as folder '
                    f'names ({safe}); choose distinct labels')
  return name, safe, rows


def expand_cells(ablation) -> list[tuple[str, dict, dict]]:
  """The cells of `ablation.axes`: zipped within an axis, crossed across.

  Returns:
    (name, {axis: label}, {key: value}) per cell, the first axis outermost.
  """
  if not ablation.axes:
    raise UserError('config.axes is empty: add at least one axis, e.g. '
                    "axis('sharing', {'model.cross_layer_sharing': "
                    "('none', 'all')})")
  axes, seen_keys = [], {}
  for i, axis in enumerate(ablation.axes):
    name, labels, rows = _check_axis(axis, i)
    if any(name == a[0] for a in axes):
      raise UserError(f"config.axes: two axes are named '{name}'; rename one")
    for key in axis['keys']:
      if key in _DRIVER_KEYS:
        raise UserError(f"config.axes '{name}' sets '{key}', which the driver "
                        'sets (use num_seeds/first_seed and budget)')
      if key in seen_keys:
        raise UserError(f"config.axes '{name}' and '{seen_keys[key]}' both "
                        f"set '{key}'; zip them into one axis")
      seen_keys[key] = name
    axes.append((name, labels, rows, tuple(axis['keys'])))
  cells = []
  for choice in itertools.product(*(range(len(a[1])) for a in axes)):
    labels = {a[0]: a[1][i] for a, i in zip(axes, choice)}
    settings = {k: v for a, i in zip(axes, choice)
                for k, v in zip(a[3], a[2][i])}
    name = '__'.join(f'{axis}-{label}' for axis, label in labels.items())
    cells.append((name, labels, settings))
  return cells


def _override_leaves(tree, prefix: str = '') -> dict[str, Any]:
  """{'a.b': value} for every leaf of the overrides tree."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_override_leaves(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _axis_keys(ablation) -> list[str]:
  return [k for a in ablation.axes for k in a['keys']]


def check_ablation(ablation) -> list[tuple[str, dict, dict]]:
  """Checks the ablation's own keys (not yet the cells' experiment configs).

  Returns:
    `expand_cells(ablation)`.

  Raises:
    UserError naming the first bad key and what it allows.
  """
  cells = expand_cells(ablation)
  names = [c[0] for c in cells]
  if ablation.baseline and ablation.baseline not in names:
    close = difflib.get_close_matches(ablation.baseline, names, n=1)
    hint = (f"did you mean '{close[0]}'?" if close
            else f'cells: {", ".join(names)}')
    raise UserError(f"config.baseline='{ablation.baseline}' is no cell; {hint}")
  config_validation.check_range('num_seeds', ablation.num_seeds, low=1)
  config_validation.check_range('first_seed', ablation.first_seed, low=0)
  config_validation.check_choice('budget.kind', ablation.budget.kind,
                                 BUDGET_KINDS)
  config_validation.check_range('budget.value', ablation.budget.value, low=0,
                                low_open=True)
  if ablation.budget.kind == 'steps' and ablation.budget.value % 1:
    raise UserError(f'config.budget.value={ablation.budget.value} is not a '
                    "whole number of steps (budget.kind='steps')")
  overrides = _override_leaves(ablation.overrides)
  for key in overrides:
    if key in _DRIVER_KEYS:
      raise UserError(f"config.overrides.{key} is set by the driver: remove "
                      'it (the budget sets the length, num_seeds and '
                      'first_seed the seeds)')
    if key in _axis_keys(ablation):
      raise UserError(f"config.overrides.{key} is also set by an axis; "
                      'remove it from one of them')
  if not ablation.metrics:
    raise UserError("config.metrics is empty: name at least one, e.g. "
                    "(('eval/accuracy', 'higher'),)")
  for entry in ablation.metrics:
    if (not isinstance(entry, (tuple, list)) or len(entry) != 2
        or not str(entry[0]).startswith('eval/')):
      raise UserError(f'config.metrics entry {entry!r} must be a (key, '
                      "direction) pair of a final metric, e.g. "
                      "('eval/accuracy', 'higher')")
    config_validation.check_choice(f'metrics ({entry[0]})', entry[1],
                                   DIRECTIONS)
  _check_plot(ablation, cells)
  return cells


def _check_plot(ablation, cells) -> None:
  axis_names = [a['name'] for a in ablation.axes]
  for name in ablation.plot.group_by:
    config_validation.check_choice('plot.group_by', name, axis_names)
  x = ablation.plot.x
  keys = [k for k in _axis_keys(ablation) if k != BASE_CONFIG_KEY]
  if not x or x in ablation_report.PLOT_X:
    return
  config_validation.check_choice('plot.x', x,
                                 ablation_report.PLOT_X + tuple(keys))
  for _, _, settings in cells:
    value = settings[x]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise UserError(f"config.plot.x='{x}' takes the value {value!r}, "
                      "which is not a number; use a numeric axis key or "
                      f"one of {', '.join(ablation_report.PLOT_X)}")


# ---- One cell's experiment config --------------------------------------------


def _set_key(config, key: str, value, *, where: str, source: str) -> None:
  """config[key] = value for a dotted key the config declares.

  `model.ARG` may also be new: config.model holds the model's constructor
  arguments, and the config may leave out those with defaults
  (`train.build_experiment` checks them against the class). A dict value
  replaces that subtree wholesale (e.g. a whole `model`).
  """
  *parents, leaf = key.split('.')
  node = config
  for part in parents:
    node = (node.get(part) if isinstance(node, ml_collections.ConfigDict)
            else None)
  if not isinstance(node, ml_collections.ConfigDict) or (
      leaf not in node and parents != ['model']):
    close = difflib.get_close_matches(
        key, sorted(config_files.key_paths(config)), n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ''
    raise UserError(f"{where}: {source} has no key '{key}'{hint}")
  if isinstance(value, dict):
    value = ml_collections.ConfigDict(value)
  try:
    node[leaf] = value
  except (TypeError, ValueError) as e:
    raise UserError(f'{where}: cannot set {key}={value!r}: '
                    f'{str(e).splitlines()[0]}') from e


def cell_config(ablation, name: str, settings: dict):
  """The experiment config of one cell (first seed, budget not applied).

  The base config file (the cell's own when an axis switches it), then
  `ablation.overrides`, then the cell's axis values.
  """
  where = f"cell '{name}'"
  source = settings.get(BASE_CONFIG_KEY, ablation.base_config)
  if not source:
    raise UserError('config.base_config is empty: name the experiment config, '
                    "e.g. 'configs/cnn_fashion_mnist.py'")
  try:
    config = config_files.load_config(source)
  except UserError as e:
    raise UserError(f'{where}: {e}') from e
  except Exception as e:  # The config file's own code can raise anything.
    first_line = (str(e).strip().splitlines() or [''])[0]
    raise UserError(f"{where}: could not load '{source}': "
                    f'{type(e).__name__}: {first_line}') from e
  values = {**_override_leaves(ablation.overrides),
            **{k: v for k, v in settings.items() if k != BASE_CONFIG_KEY}}
  for key, value in values.items():
    _set_key(config, key, value, where=where, source=source)
  config.seed = ablation.first_seed
  return config


def budget_steps(budget, *, batch_size: int,
                 num_train_examples: Optional[int] = None,
                 flops_per_step: Optional[float] = None) -> int:
  """Training steps of one seed that spend `budget` (at least 1).

  Args:
    budget: `ablation.budget` ({'kind', 'value'}).
    batch_size: the cell's global batch size.
    num_train_examples: the training split's size (kind 'epochs').
    flops_per_step: FLOPs of one training step of one seed (kind 'flops').
  """
  kind, value = budget.kind, budget.value
  if kind == 'steps':
    steps = value
  elif kind == 'examples':
    steps = math.ceil(value / batch_size)
  elif kind == 'epochs':
    if num_train_examples is None:
      raise UserError("budget.kind='epochs' needs a dataset of known size, "
                      "but this task generates its data; use budget.kind="
                      "'steps', 'examples' or 'flops'")
    steps = math.ceil(value * num_train_examples / batch_size)
  else:
    steps = math.ceil(value / flops_per_step)
  return max(int(steps), 1)


def plan(ablation) -> list[Cell]:
  """Checks the whole ablation and builds every cell, tracing but not running.

  Raises:
    UserError: a bad ablation key, or a cell whose experiment config does not
      build (prefixed with the cell's name).
  """
  cells = []
  for name, labels, settings in check_ablation(ablation):
    config = cell_config(ablation, name, settings)
    # The length comes from the budget, which may need the step's FLOPs;
    # a step's FLOPs do not depend on the length.
    config.num_train_steps = 1
    try:
      exp = train.build_experiment(config)
      counts = train.parameter_counts(exp)
      step_flops = (train_step_flops(config, exp)
                    if ablation.budget.kind == 'flops' else None)
      config.num_train_steps = budget_steps(
          ablation.budget, batch_size=config.batch_size,
          num_train_examples=exp.task.num_train_examples,
          flops_per_step=step_flops)
    except UserError as e:
      raise UserError(f"cell '{name}': {e}") from e
    if config.optimizer.warmup_steps >= config.num_train_steps:
      logging.warning("Cell '%s' trains %d steps, within its %d warmup "
                      'steps: the learning rate never peaks', name,
                      config.num_train_steps, config.optimizer.warmup_steps)
    cells.append(Cell(name=name, labels=labels, settings=settings,
                      config=config,
                      parameters={k: int(counts[k])
                                  for k in ('unique', 'effective')},
                      flops_per_step=step_flops))
  return cells


# ---- FLOPs of a training step ------------------------------------------------


def train_step_flops(config, exp: train.Experiment) -> float:
  """FLOPs of one training step of one seed at config.batch_size.

  The matmuls and convolutions of the traced step (forward, backward and
  update), scan bodies times their length (`bigjax/flops.py`: XLA's own
  count sees a scanned layer or time step once). Traced, not run.
  """
  abstract_state = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  batches = exp.task.train_batches(global_batch_size=config.batch_size,
                                   seed=config.seed, start_step=0)
  batch = next(batches)
  if hasattr(batches, 'close'):
    batches.close()  # Stops the prefetch threads.
  return flops.jaxpr_flops(exp.train_step, abstract_state, jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), batch))


# ---- Running cells -----------------------------------------------------------


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def seeds(ablation) -> list[int]:
  return list(range(ablation.first_seed,
                    ablation.first_seed + ablation.num_seeds))


def _train_seeds(ablation, cell: Cell, config, cell_dir: str):
  """Trains every seed of `cell` that has not finished.

  Returns:
    {seed: wall seconds of its training}, one shared figure per seed in
    one-program mode; None if a SIGTERM stopped training (checkpoint saved).
  """
  if ablation.seeds_in_one_program:
    config.num_seeds = ablation.num_seeds
    start = time.perf_counter()
    if not train.train_and_evaluate(config, cell_dir):
      return None
    wall = time.perf_counter() - start
    return {s: wall for s in seeds(ablation)}
  walls = {}
  for seed in seeds(ablation):
    seed_dir = os.path.join(cell_dir, f'seed_{seed}')
    done = os.path.join(seed_dir, SEED_FILE)
    if os.path.exists(done):  # Finished before the ablation was stopped.
      walls[seed] = _read_json(done)['wall_s']
      continue
    seed_config = copy.deepcopy(config)
    seed_config.seed = seed
    seed_config.num_seeds = 1
    logging.info("Cell '%s', seed %d: %d steps", cell.name, seed,
                 config.num_train_steps)
    start = time.perf_counter()
    if not train.train_and_evaluate(seed_config, seed_dir):
      return None
    walls[seed] = time.perf_counter() - start
    metric_writers.write_json_atomic(done, {'wall_s': walls[seed]})
  return walls


def _run_cell(ablation, cell: Cell, cell_dir: str) -> Optional[dict]:
  """Trains `cell` and writes its cell.json; None if SIGTERM stopped it."""
  config = copy.deepcopy(cell.config)
  flops_per_step = cell.flops_per_step
  if flops_per_step is None:
    flops_per_step = train_step_flops(config, train.build_experiment(config))
  walls = _train_seeds(ablation, cell, config, cell_dir)
  if walls is None:
    return None
  final = {}
  for seed in seeds(ablation):
    path = os.path.join(cell_dir, f'seed_{seed}', 'final_metrics.json')
    if not os.path.exists(path):
      raise RuntimeError(f'{path} is missing after training: the trainer '
                         'wrote no per-seed metrics')
    final[str(seed)] = _read_json(path)
  steps, batch = config.num_train_steps, config.batch_size
  wall = (next(iter(walls.values())) if ablation.seeds_in_one_program
          else sum(walls.values()))
  summary = {
      'name': cell.name, 'labels': cell.labels, 'settings': cell.settings,
      'parameters': cell.parameters, 'batch_size': batch, 'steps': steps,
      'flops_per_step': flops_per_step,
      'flops_per_example': flops_per_step / batch,
      'flops_per_seed': flops_per_step * steps,
      'seeds': seeds(ablation),
      'seeds_in_one_program': ablation.seeds_in_one_program,
      'wall_s': wall, 'seed_wall_s': {str(s): w for s, w in walls.items()},
      'examples_per_sec': steps * batch * len(walls) / wall,
      'final_metrics': final,
  }
  metric_writers.write_json_atomic(os.path.join(cell_dir, CELL_FILE), summary)
  return summary


# ---- The whole ablation ------------------------------------------------------


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort(sort_keys=True))


def check_drift(ablation, cells: list[Cell], workdir: str) -> None:
  """Refuses a WORKDIR whose ablation.json came from another ablation.

  Compares the ablation config (not baseline, metrics or plot, which only
  change the report) and each cell's resolved experiment config (what
  `train.check_config_drift` compares: an edited base config file counts).
  """
  path = os.path.join(workdir, ABLATION_FILE)
  if not os.path.exists(path):
    return
  saved = _read_json(path)
  strip = lambda c: {k: v for k, v in c.items() if k not in _REPORT_KEYS}
  changes = config_validation.computation_changes(
      strip(saved['config']), strip(ablation_report.config_json(ablation)))
  saved_configs = {c['name']: c['config'] for c in saved['cells']}
  for cell in cells if not changes else ():
    if cell.name in saved_configs:
      changes += [f"cell '{cell.name}' {change}" for change in
                  config_validation.computation_changes(
                      saved_configs[cell.name], _config_json(cell.config))]
  if changes:
    shown = '; '.join(changes[:3]) + (
        f'; and {len(changes) - 3} more' if len(changes) > 3 else '')
    raise UserError(
        f'{workdir} holds an ablation of another config ({shown}): use a new '
        '--workdir, or rerun with the config it was started with')


def run_ablation(ablation, workdir: str) -> dict:
  """Trains every unfinished cell of `ablation` in `workdir` and reports.

  Returns:
    The report (what results.json holds; see ablation_report.write).
  """
  cells = plan(ablation)
  check_drift(ablation, cells, workdir)
  os.makedirs(os.path.join(workdir, 'cells'), exist_ok=True)
  metric_writers.write_json_atomic(os.path.join(workdir, ABLATION_FILE), {
      'config': ablation_report.config_json(ablation),
      'cells': [{'name': c.name, 'labels': c.labels, 'settings': c.settings,
                 'config': _config_json(c.config)} for c in cells]})
  summaries = {}
  for cell in cells:
    path = os.path.join(workdir, 'cells', cell.name, CELL_FILE)
    if os.path.exists(path):
      summaries[cell.name] = _read_json(path)
  logging.info('Ablation of %d cells x %d seeds in %s; %d finished before',
               len(cells), ablation.num_seeds, workdir, len(summaries))
  report = ablation_report.write(workdir, ablation, cells, summaries)
  # The seeds of a cell run the same programs: compile them once.
  with platform.compilation_cache(os.path.join(workdir, COMPILATION_CACHE)):
    for i, cell in enumerate(cells, start=1):
      if cell.name in summaries:
        continue
      logging.info("Cell %d/%d '%s'", i, len(cells), cell.name)
      summary = _run_cell(ablation, cell,
                          os.path.join(workdir, 'cells', cell.name))
      if summary is None:
        logging.info('Stopped by SIGTERM; rerun the same command to resume')
        break
      summaries[cell.name] = summary
      report = ablation_report.write(workdir, ablation, cells, summaries)
  return report
