"""The base ablation config: every key the ablation driver reads.

An ablation trains a set of cells (variants of one experiment config), each
with several seeds, and reports them side by side (`bigjax/ablation.py`):

  python -m experiments.ablate --config=configs/ablations/NAME.py \
      --workdir=workdirs/ablations/NAME [--config.KEY=VALUE ...]

Ablation configs (`configs/ablations/NAME.py`) start from `get_config()` here
and set values; they never add keys. `overrides` is the one open subtree: its
leaves are keys of the experiment config. This file is Python and runs when
loaded, like every config file.
"""

import ml_collections


def get_config(arg=None):
  del arg  # The base has no variants.
  c = ml_collections.ConfigDict()

  # The experiment config every cell starts from, as --config of
  # experiments.train takes it: 'configs/NAME.py' or 'configs/NAME.py:VARIANT'
  # (relative to the directory the driver runs in). An axis whose keys
  # include 'base_config' switches it per cell (e.g. one model family per
  # cell, each with its own recipe).
  c.base_config = ''

  # Values set in every cell's experiment config before the axes' values, as
  # a tree mirroring it (`nested({'optimizer.warmup_steps': 20})` builds
  # one), e.g. shorter evaluation or no samples for the ablation. Each leaf
  # must be a key of the experiment config; a key an axis also sets is an
  # error. The budget sets the training length, so num_train_steps and
  # num_epochs may not appear here, nor seed (the seeds are the driver's).
  c.overrides = ml_collections.ConfigDict()

  # What varies, as a tuple of `axis(...)` dicts. Within an axis the value
  # lists of its keys are zipped (equal lengths, one cell per position);
  # several axes are crossed (a grid, the first axis outermost). Each axis is
  # {'name': str, 'keys': (key, ...), 'values': ((value per cell, ...) per
  # key), 'labels': (one str per cell, or () to derive them from the
  # values)}. A dict value replaces that subtree of the experiment config
  # wholesale (e.g. a whole `model`). Cells are named
  # 'AXIS-LABEL__AXIS-LABEL' (characters other than letters, digits, '.',
  # '_' and '-' become '_'), which is their folder under WORKDIR/cells/.
  c.axes = ()

  # The cell the paired comparisons are against, by name
  # (e.g. 'sharing-none'); '' takes the first cell.
  c.baseline = ''

  # Seeds first_seed, ..., first_seed + num_seeds - 1 train every cell; a
  # cell's seed s is compared with the baseline's seed s.
  c.num_seeds = 3
  c.first_seed = 0
  # True: a cell's seeds train together through jax.vmap in one compiled
  # program (the trainer's config.num_seeds); False: one after another.
  # Both write WORKDIR/cells/CELL/seed_S/final_metrics.json.
  c.seeds_in_one_program = False

  # How long every cell trains, for compute-matched comparisons:
  #   'steps'     value steps of the cell's batch size;
  #   'examples'  ceil(value / batch_size) steps;
  #   'epochs'    value passes over the training split (not for tasks that
  #               generate their data);
  #   'flops'     value training FLOPs per seed, converted to steps with the
  #               FLOPs of one compiled training step (XLA's cost analysis),
  #               so a bigger model trains fewer steps.
  c.budget = ml_collections.ConfigDict()
  c.budget.kind = 'steps'
  c.budget.value = 0.0

  # The final metrics reported (keys of a run's final_metrics.json), each
  # with the direction that is better: (('eval/accuracy', 'higher'),
  # ('eval/loss', 'lower')). The table marks the best mean of each.
  c.metrics = ()

  # Plots in WORKDIR/plots/: one bar chart per metric, and each metric
  # against `x`: 'unique_parameters', 'effective_parameters',
  # 'flops_per_example', 'steps', 'flops_per_seed' (the compute budget), a
  # numeric key that an axis sets (e.g. 'data.synthetic.max_length'), or ''
  # for bars only.
  c.plot = ml_collections.ConfigDict()
  c.plot.x = 'unique_parameters'
  # Axes whose labels tell the lines apart (points of one line share them);
  # () draws one line per combination of the axes that do not set `x`.
  c.plot.group_by = ()
  # A logarithmic x axis (e.g. for parameter counts spanning decades).
  c.plot.log_x = False
  return c


def axis(name: str, values: dict, labels=()) -> dict:
  """One axis of an ablation (see `axes` above).

  Args:
    name: the axis name, e.g. 'sharing'; it prefixes its cells' names.
    values: {key: (value of cell 0, value of cell 1, ...)}, keys in order;
      the lists are zipped.
    labels: a short str per position (e.g. 'untied'), or () to derive them
      from the values.
  """
  return {'name': name, 'keys': tuple(values),
          'values': tuple(tuple(v) for v in values.values()),
          'labels': tuple(labels)}


# Overrides nearly every ablation wants: the table compares end points, so
# only the final evaluation; no pictures, log lines instead of a progress
# bar, and no language-model samples (sampling compiles a decoder: seconds
# per seed that the table never reads). `nested({**END_POINTS, ...})`.
END_POINTS = {
    'eval_every_steps': 1_000_000,
    'write_plots': False,
    'progress_bar': False,
    'samples.num_tokens': 0,
}

# The character LM the attention ablations vary (configs/transformer_shakespeare.py
# made small: 64-character context, width 64, MLP 256), and what they report.
SMALL_CHAR_LM = {
    'data.seq_len': 64,
    'model.max_len': 64,
    'model.d_model': 64,
    'model.mlp_dim': 256,
}
LM_METRICS = (('eval/bits_per_token', 'lower'), ('eval/accuracy', 'higher'))


def nested(dotted: dict) -> ml_collections.ConfigDict:
  """A ConfigDict tree from {'a.b': value}: the form `overrides` takes."""
  tree = ml_collections.ConfigDict()
  for key, value in dotted.items():
    *parents, leaf = key.split('.')
    node = tree
    for p in parents:
      if p not in node:
        node[p] = ml_collections.ConfigDict()
      node = node[p]
    node[leaf] = value
  return tree


def apply_variant(c, arg, config_name: str):
  """Applies the variants every ablation config shares, named by `arg`.

  ':smoke' is the whole ablation in miniature, for tests and for trying a
  config: 2 seeds of 10 steps per cell, evaluating, saving and logging at
  step 10 only. Anything else but no variant is an error.
  """
  if arg == 'smoke':
    c.num_seeds = 2
    c.budget.kind = 'steps'
    c.budget.value = 10.0
    for key, value in (('eval_every_steps', 10), ('log_every_steps', 10),
                       ('checkpoint.save_every_steps', 10),
                       ('optimizer.warmup_steps', 2)):
      c.overrides.update(nested({key: value}))
  elif arg:
    raise ValueError(
        f"unknown variant {arg!r} of {config_name}; use ':smoke' or none")
  return c
