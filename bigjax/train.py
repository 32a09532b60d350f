"""Training and evaluation: the loop, and the pure steps it jits.

The path from the command line: `experiments/train.py` parses flags and calls
`train_and_evaluate(config, workdir)`, which validates the config, builds the
task (data, loss, metrics; `bigjax/tasks.py`), model and optimiser, creates
(or restores) a sharded `TrainState`, and runs `train_step` / `eval_step`
under `jax.jit`. The loop is the same for classifiers, language models and
seq2seq models; only the bound task differs.
"""

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from bigjax import checkpointing
from bigjax import config_validation
from bigjax import losses
from bigjax import metric_writers
from bigjax import optimizers
from bigjax import precision
from bigjax import sharding
from bigjax import tasks
from bigjax.errors import UserError
from bigjax.models import axes
from bigjax.models import param_counts


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped.

  Attributes:
    step: int32 [], the number of batches trained on so far (skipped,
      non-finite updates included: the data position).
    params: the model's trainable parameters.
    model_state: the model's other variable collections (e.g. BatchNorm
      statistics, {'batch_stats': ...}); {} for models without any.
    opt_state: the optimiser's state.
    rng: uint32 [2], the run's base key; each step folds in its step number,
      so randomness depends only on (seed, step) and survives a resume.
    nonfinite_streak: int32 [], how many steps in a row ended with a
      non-finite loss or gradient (and so were skipped); 0 after a good one.
  """
  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_streak: jax.Array


# What `jax.vmap` maps when seeds train together: every TrainState leaf gains
# a leading seed axis except the step, which all seeds share, so checkpoints,
# logs and the data position keep one step number.
SEED_AXES = TrainState(step=None, params=0, model_state=0, opt_state=0, rng=0,
                       nonfinite_streak=0)


@dataclasses.dataclass(frozen=True)
class Seeds:
  """The seeds one run trains: `count` consecutive values from `first`.

  count == 1 is an ordinary run. count > 1 (`config.num_seeds`) trains them
  together in one compiled program: `jax.vmap` over the init, dropout and
  data-order randomness, so seed `first + k` follows the run it would have
  had alone (to float rounding: batched kernels may sum in another order).
  The state then holds a leading [count] axis on every leaf but `step`, and
  each seed's metrics go to WORKDIR/seed_{value}/.
  """
  first: int
  count: int = 1

  @property
  def stacked(self) -> bool:
    return self.count > 1

  @property
  def values(self) -> range:
    return range(self.first, self.first + self.count)

  def rng(self) -> jax.Array:
    """uint32 [2], or [count, 2] stacked: the keys the states start from."""
    keys = [jax.random.PRNGKey(s) for s in self.values]
    return jnp.stack(keys) if self.stacked else keys[0]

  def vmap(self, fn, in_axes, out_axes):
    """`fn` over stacked seeds (`jax.vmap`), or `fn` itself for one seed."""
    if not self.stacked:
      return fn
    return jax.vmap(fn, in_axes=in_axes, out_axes=out_axes)

  def shardings(self, tree, axes=SEED_AXES):
    """Shardings for the stacked tree: the seed axis is not split."""
    if not self.stacked:
      return tree
    def stack(mapped, leaf_sharding):
      if mapped is None:
        return leaf_sharding
      return jax.tree.map(
          lambda s: jax.sharding.NamedSharding(s.mesh, P(None, *s.spec)),
          leaf_sharding)
    return jax.tree.map(stack, axes, tree, is_leaf=lambda x: x is None)

  def batches(self, task, *, global_batch_size: int, start_step: int):
    """Training batches; stacked, [count, batch, ...], one stream per seed."""
    streams = [task.train_batches(global_batch_size=global_batch_size,
                                  seed=s, start_step=start_step)
               for s in self.values]
    if not self.stacked:
      return streams[0]
    return (jax.tree.map(lambda *xs: np.stack(xs), *group)
            for group in zip(*streams))

  def unstack(self, tree) -> list:
    """A host tree with a leading seed axis -> one tree per seed."""
    if not self.stacked:
      return [tree]
    return [jax.tree.map(lambda x, k=k: x[k], tree) for k in range(self.count)]

  def first_of(self, tree):
    """The first seed's part of a stacked (device) tree."""
    return jax.tree.map(lambda x: x[0], tree) if self.stacked else tree


def seeds_of(config) -> Seeds:
  return Seeds(config.seed, config.num_seeds)


def init_variables(rng, *, model: nn.Module, task):
  """The model's variables, parameters boxed with their logical axis names."""
  return model.init(rng, task.dummy_inputs(), train=False)


def create_train_state(rng, *, model: nn.Module, tx, task,
                       policy: precision.Policy = precision.FLOAT32
                       ) -> TrainState:
  """A fresh TrainState, parameters in `policy.param_dtype`; pure, so it runs
  under jit with sharded outputs."""
  init_rng, run_rng = jax.random.split(rng)
  # The logical-axis boxes are only read for shardings (`state_shardings`);
  # the state itself holds plain arrays.
  variables = nn.unbox(init_variables(init_rng, model=model, task=task))
  params = policy.cast_to_param(variables['params'])
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    model_state=_model_state(variables),
                    opt_state=tx.init(params), rng=run_rng,
                    nonfinite_streak=jnp.zeros((), jnp.int32))


def _model_state(variables):
  """The collections a step reads and updates (e.g. BatchNorm's
  'batch_stats'); parameter-use markers and captured intermediates are not
  state."""
  return {k: v for k, v in variables.items()
          if k not in ('params', 'intermediates', param_counts.PARAM_USES)}


def _apply(model, params, model_state, inputs, *, train, policy, rng=None):
  """The model's float32 logits and its updated model state; parameters and
  inputs run in `policy.compute_dtype` (model state as it is stored)."""
  rngs = {'dropout': rng} if rng is not None else None
  logits, model_state = model.apply(
      {'params': policy.cast_to_compute(params), **model_state},
      policy.cast_to_compute(inputs), train=train, rngs=rngs,
      mutable=list(model_state))
  return policy.cast_to_output(logits), model_state


def _all_finite(tree) -> jax.Array:
  """bool []: whether every element of every leaf is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x))
                            for x in jax.tree.leaves(tree)]))


def train_step(state: TrainState, batch, *, model: nn.Module,
               tx: optax.GradientTransformation, task,
               l1: float, l2: float, schedule: optax.Schedule,
               nan_at_steps: tuple[int, ...] = (),
               policy: precision.Policy = precision.FLOAT32):
  """One update on a global batch, skipped if it is not finite.

  A non-finite loss or gradient leaves parameters, optimizer state and model
  state bitwise as they were (the step still advances: the batch is
  consumed) and lengthens `nonfinite_streak`; the loop stops the run when the
  streak reaches its limit. Unlike `optax.apply_if_finite`, no bad update is
  ever applied.

  Args:
    state: the current TrainState (donated by the caller's jit).
    batch: a global batch in the task's format (e.g. {'image': float32
      [batch, H, W, C], 'label': int32 [batch]}).
    model, tx, task, l1, l2, schedule: bound with functools.partial.
    nan_at_steps: step numbers (1-based, as logged) whose loss is made NaN,
      to test the guard (`config.nonfinite.inject_nan_at_steps`).
    policy: the dtypes of compute (`bigjax.precision`); the penalty and the
      update use the stored parameters.

  Returns:
    The new state and a flat dict of scalar metrics for this step.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  # 1 normally, NaN at an injected step: multiplying makes the gradients NaN
  # too, and x * 1.0 == x exactly otherwise.
  poison = jnp.where(jnp.isin(state.step + 1, jnp.asarray(nan_at_steps,
                                                          jnp.int32)),
                     jnp.nan, 1.0)

  def objective(params):
    logits, model_state = _apply(model, params, state.model_state,
                                 task.model_inputs(batch), train=True,
                                 policy=policy, rng=rng)
    data_loss, task_metrics = task.loss(logits, batch)
    data_loss = data_loss * poison
    penalty = losses.weight_penalty(params, l1=l1, l2=l2)
    return data_loss + penalty, (data_loss, penalty, task_metrics, model_state)

  grads, (data_loss, penalty, task_metrics, model_state) = jax.grad(
      objective, has_aux=True)(state.params)
  finite = jnp.isfinite(data_loss) & jnp.isfinite(penalty) & _all_finite(grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep_old = functools.partial(jax.tree.map,
                               lambda new, old: jnp.where(finite, new, old))
  metrics = {
      'train/loss': data_loss,
      'train/penalty': penalty,
      **{f'train/{k}': v for k, v in task_metrics.items()},
      'train/grad_norm': optax.tree.norm(grads),
      'train/learning_rate': schedule(state.step),
      'train/skipped': 1.0 - finite.astype(jnp.float32),
  }
  new_state = state.replace(
      step=state.step + 1, params=keep_old(params, state.params),
      model_state=keep_old(model_state, state.model_state),
      opt_state=keep_old(opt_state, state.opt_state),
      nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1))
  return new_state, metrics


def eval_step(state: TrainState, batch, *, model: nn.Module, task,
              policy: precision.Policy = precision.FLOAT32):
  """The task's sums over one eval batch, to be added up over the split.

  Returns:
    `task.eval_sums(logits, batch)`, e.g. {'loss_sum': [], 'count': [], ...};
    a 'predictions' entry is per example and is not summed.
  """
  logits, _ = _apply(model, state.params, state.model_state,
                     task.model_inputs(batch), train=False, policy=policy)
  return task.eval_sums(logits, batch)


def evaluate(state, *, eval_fn, task, eval_batch_size, batch_sharding,
             seeds: Seeds = Seeds(0)):
  """Runs `eval_fn` over the whole eval split.

  Returns:
    A flat dict of 'eval/...' scalars per seed (a list of one for an
    ordinary run), the first seed's summed eval outputs (NumPy), and the
    first local batch with the first seed's 'predictions' if the task has
    them (for pictures).
  """
  totals, first = None, None
  for local in task.eval_batches(global_batch_size=eval_batch_size):
    out = eval_fn(state, sharding.global_batch(local, batch_sharding))
    sums = {k: v for k, v in out.items() if k != 'predictions'}
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if first is None:
      first = dict(local)
      if 'predictions' in out:
        # They cover the global batch; this process's examples are its rows.
        rows = sharding.process_rows(batch_sharding, eval_batch_size)
        first['predictions'] = np.asarray(jax.device_get(
            seeds.first_of(out['predictions'])))[rows]
  per_seed = seeds.unstack(jax.device_get(totals))
  scalars = [{f'eval/{k}': v for k, v in task.eval_scalars(t).items()}
             for t in per_seed]
  return scalars, per_seed[0], first


def total_train_steps(config, num_train_examples) -> int:
  """config.num_train_steps, or num_epochs over the training split."""
  if config.num_train_steps > 0:
    return config.num_train_steps
  if num_train_examples is None:
    raise UserError(f'config.task={config.task!r} generates its data and has '
                    'no epochs: set config.num_train_steps > 0')
  return int(np.ceil(config.num_epochs * num_train_examples / config.batch_size))


CONFIG_FILE = 'config.json'


def _config_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True) + '\n'


def check_config_drift(config, workdir: str, *, allow: bool) -> None:
  """Refuses to resume a run under a config that computes something else.

  Compares `config` with WORKDIR/config.json (the run's first config).
  Layout and output keys (mesh, sharding, intervals, pictures) may change;
  anything else raises UserError listing the differing keys, unless `allow`,
  which logs them instead and keeps the old file as config.previous.json.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  changes = config_validation.computation_changes(
      saved, json.loads(_config_json(config)))
  if not changes:
    return
  if not allow:
    raise UserError(
        f'{workdir} holds a run of another config ({"; ".join(changes)}): '
        'use a new --workdir, or pass --allow_config_change to resume under '
        'the new values')
  logging.warning('Resuming %s under a changed config: %s', workdir,
                  '; '.join(changes))
  if jax.process_index() == 0:
    os.replace(path, os.path.join(workdir, 'config.previous.json'))


def _write_config(config, workdir):
  """Saves the resolved config as JSON; a resumed run keeps the first copy."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    with open(path, 'w') as f:
      f.write(_config_json(config))


def _write_pictures(workdir, *, step, task, sums, first_batch):
  """Curves for every task, plus what the task draws (e.g. a confusion
  matrix and predictions)."""
  from bigjax import plots  # matplotlib is only needed when plotting.
  pictures = os.path.join(workdir, 'pictures')
  plots.plot_curves(metric_writers.read_history(workdir, up_to_step=step),
                    os.path.join(pictures, 'curves.png'),
                    title=f'step {step}')
  task.write_pictures(pictures, sums=sums, first_batch=first_batch)


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What a config resolves to, before any array exists."""
  task: Any  # One of bigjax.tasks: data, loss and metrics.
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  num_steps: int
  policy: precision.Policy = precision.FLOAT32
  l1: float = 0.0  # config.loss.l1 and l2: the weight penalties.
  l2: float = 0.0
  nan_at_steps: tuple[int, ...] = ()  # config.nonfinite.inject_nan_at_steps.

  @property
  def init_state(self):
    """rng -> a fresh TrainState (`create_train_state`, bound)."""
    return functools.partial(create_train_state, model=self.model, tx=self.tx,
                             task=self.task, policy=self.policy)

  @property
  def train_step(self):
    """(state, batch) -> (state, metrics) (`train_step`, bound)."""
    return functools.partial(
        train_step, model=self.model, tx=self.tx, task=self.task, l1=self.l1,
        l2=self.l2, schedule=self.schedule, nan_at_steps=self.nan_at_steps,
        policy=self.policy)

  @property
  def eval_step(self):
    """(state, batch) -> the batch's eval sums (`eval_step`, bound)."""
    return functools.partial(eval_step, model=self.model, task=self.task,
                             policy=self.policy)

  @functools.cached_property
  def abstract_variables(self):
    """The model's variables as boxed `jax.ShapeDtypeStruct`s (no compute);
    traced once per experiment, for counts, groups, shardings and reports."""
    return jax.eval_shape(
        functools.partial(init_variables, model=self.model, task=self.task),
        jax.random.PRNGKey(0))


def build_experiment(config, workdir: Optional[str] = None, *,
                     make_task=tasks.make_task) -> Experiment:
  """Validates `config` and builds the objects it names (no compute).

  `workdir` is only read (a resumed language model reuses its tokenizer).
  `make_task(config, loss_fn, workdir)` builds the task; benchmarks pass one
  that describes the data instead of reading a prepared dataset.
  Raises UserError for a bad config or missing data.
  """
  config_validation.validate(config)
  task = make_task(config, losses.make_loss(config.loss), workdir)
  model_cls, model_kwargs = config_validation.model_class_and_kwargs(
      config.model)
  for key, want in task.model_kwargs.items():
    if model_kwargs.get(key, want) != want:
      raise UserError(
          f'config.model.{key}={model_kwargs[key]} but the data ('
          f"'{config.data.name}') need {want}; set --config.model.{key}={want}")
  num_steps = total_train_steps(config, task.num_train_examples)
  schedule = optimizers.make_schedule(config.optimizer, num_steps)
  exp = Experiment(
      task=task, model=model_cls(**model_kwargs),
      tx=optimizers.make_optimizer(config.optimizer, schedule),
      schedule=schedule, num_steps=num_steps,
      policy=precision.from_config(config.precision), l1=config.loss.l1,
      l2=config.loss.l2,
      nan_at_steps=tuple(config.nonfinite.inject_nan_at_steps))
  if config.optimizer.frozen or config.optimizer.lr_multipliers:
    params = nn.unbox(exp.abstract_variables)['params']
    optimizers.check_groups(config.optimizer, [
        axes.path_text(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(params)])
  return exp


def parameter_counts(exp: Experiment) -> dict[str, int]:
  """Unique and effective parameter counts, from shapes alone (no init)."""
  return param_counts.count_parameters(nn.unbox(exp.abstract_variables))


def _log_parameters(exp: Experiment) -> None:
  counts = parameter_counts(exp)
  per_module = ', '.join(
      f'{k.split("/", 1)[1]} {v:,}' for k, v in counts.items()
      if k.startswith('unique/'))
  logging.info('Parameters: %s unique, %s effective (%s)',
               f'{counts["unique"]:,}', f'{counts["effective"]:,}', per_module)


def state_shardings(exp: Experiment, abstract_state: TrainState, mesh,
                    rules) -> TrainState:
  """Where each array of the train state lives, from the logical rules.

  Parameters (and any boxed model state) get the specs their logical names
  resolve to; optimizer-state leaves mirror their parameter's spec; the step,
  the RNG and unnamed state (BatchNorm statistics) are replicated.

  Returns:
    A TrainState of NamedShardings.
  """
  sizes = dict(mesh.shape)
  variable_specs = sharding.logical_specs(exp.abstract_variables, rules, sizes)
  specs = TrainState(
      step=P(), params=variable_specs['params'],
      model_state={k: variable_specs[k] for k in abstract_state.model_state},
      opt_state=sharding.specs_like_params(
          abstract_state.opt_state, abstract_state.params,
          variable_specs['params']),
      rng=P(), nonfinite_streak=P())
  return sharding.named(mesh, specs)


def layout_report(exp: Experiment, abstract_state: TrainState, shardings,
                  mesh) -> str:
  """The mesh, the per-parameter table and per-device totals (text)."""
  return sharding.report(
      mesh, exp.abstract_variables['params'],
      jax.tree.map(lambda s: s.spec, shardings.params),
      {name: (getattr(abstract_state, name), getattr(shardings, name))
       for name in ('params', 'opt_state', 'model_state')})


def _with_shardings(abstract_tree, shardings):
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_tree, shardings)


def init_or_restore(exp: Experiment, seeds: Seeds, manager, mesh, rules,
                    workdir: Optional[str] = None, init_from=None):
  """The train state: where a run starts, in this order.

  1. `manager`'s newest checkpoint that verifies (this run, resumed);
  2. else, if `init_from.workdir` is set, a fresh state whose parameters
     matching `init_from.params` come from that run's newest verified
     checkpoint (fine-tuning: the rest of the parameters and the optimizer
     state start fresh; stacked seeds all start from the same ones);
  3. else a fresh state from `seeds`.

  Shapes first (`jax.eval_shape`), then shardings, then a jitted init whose
  outputs are born on their devices (no device ever holds a full copy of a
  sharded array); a restore lands on the same shardings, whatever mesh the
  checkpoint was written from.

  Returns:
    (state, state_sharding): the TrainState (stacked for several seeds,
    `Seeds`) and its pytree of shardings.
  """
  init_one = exp.init_state
  # One seed's shapes and shardings, for the layout and for `init_from`.
  one_state = jax.eval_shape(init_one, jax.random.PRNGKey(0))
  one_sharding = state_shardings(exp, one_state, mesh, rules)
  _log_parameters(exp)
  text = layout_report(exp, one_state, one_sharding, mesh)
  if seeds.stacked:
    text += (f'\nSeeds {seeds.first}..{seeds.values[-1]} train together: '
             f'the state holds {seeds.count} copies (a leading seed axis).')
  logging.info('Layout:\n%s', text)
  if workdir is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, 'sharding.txt'), 'w') as f:
      f.write(text + '\n')
  init_fn = seeds.vmap(init_one, in_axes=0, out_axes=SEED_AXES)
  state_sharding = seeds.shardings(one_sharding)
  abstract_state = _with_shardings(jax.eval_shape(init_fn, seeds.rng()),
                                   state_sharding)
  state = checkpointing.restore_latest(manager, abstract_state)
  if state is None:
    state = jax.jit(init_fn, out_shardings=state_sharding)(seeds.rng())
    if init_from is not None and init_from.workdir:
      taken = checkpointing.load_params_from(
          init_from.workdir, _with_shardings(one_state.params,
                                             one_sharding.params),
          init_from.params)
      # A no-op broadcast for one seed; the same start for stacked seeds.
      put = jax.jit(lambda params, taken: jax.tree_util.tree_map_with_path(
          lambda path, x: jnp.broadcast_to(taken[axes.path_text(path)],
                                           x.shape)
          if axes.path_text(path) in taken else x, params),
                    out_shardings=state_sharding.params)
      state = state.replace(params=put(state.params, taken))
      logging.info('Starting from %d parameters of %s, the rest fresh',
                   len(taken), init_from.workdir)
    else:
      logging.info('Starting fresh')
  else:
    logging.info('Resumed from step %d', int(jax.device_get(state.step)))
  return state, state_sharding


def load_state(config, workdir: str, *, init_from=None,
               require_checkpoint: bool = False):
  """The state `config`'s run in `workdir` starts from, without training.

  Builds the experiment and the mesh from `config` and calls
  `init_or_restore` (so: the newest verified checkpoint, else `init_from`,
  else fresh). For tools that read a run (generation, tests).

  Returns:
    (experiment, state, state_sharding).

  Raises:
    UserError: as `build_experiment`, or `require_checkpoint` and the
      workdir has no checkpoint.
  """
  exp = build_experiment(config, workdir)
  manager = checkpointing.make_manager(workdir, config.checkpoint)
  try:
    if require_checkpoint and manager.latest_step() is None:
      raise UserError(f'{workdir} has no checkpoint yet; train it first')
    state, state_sharding = init_or_restore(
        exp, seeds_of(config), manager, sharding.make_mesh(config.mesh),
        sharding.rules_from_config(config), init_from=init_from)
  finally:
    manager.close()
  return exp, state, state_sharding


def train_and_evaluate(config, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Everything is checked before anything is computed or written: a bad config,
  missing data, or a workdir whose run used a config that computes something
  else (see `check_config_drift`) raises UserError and leaves the workdir
  untouched.

  Returns:
    The metrics of the final evaluation (flat 'eval/...' dict); {} when a
    SIGTERM stopped the run early (after saving a checkpoint).
  """
  exp = build_experiment(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config)
  batch_sharding = sharding.batch_sharding(mesh, rules, config.batch_size)
  eval_sharding = sharding.batch_sharding(
      mesh, rules, config.eval_batch_size, key='eval_batch_size')
  check_config_drift(config, workdir, allow=allow_config_change)
  os.makedirs(workdir, exist_ok=True)
  manager = checkpointing.make_manager(workdir, config.checkpoint)
  seeds = seeds_of(config)
  state, state_sharding = init_or_restore(exp, seeds, manager, mesh, rules,
                                          workdir, config.init_from)
  if jax.process_index() == 0:
    _write_config(config, workdir)
  exp.task.save_assets(workdir)
  logging.info('%s: %d steps of batch %d on %d devices in %s',
               config.model.name, exp.num_steps, config.batch_size,
               jax.device_count(), workdir)

  # Stacked seeds read one batch each, [seeds, batch, ...], and share the
  # eval batch.
  batch_sharding = seeds.shardings(batch_sharding, axes=0)
  train_fn = jax.jit(
      seeds.vmap(exp.train_step, in_axes=(SEED_AXES, 0),
                 out_axes=(SEED_AXES, 0)),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, sharding.replicated(mesh)),
      donate_argnums=0)
  eval_fn = jax.jit(
      seeds.vmap(exp.eval_step, in_axes=(SEED_AXES, None), out_axes=0),
      in_shardings=(state_sharding, eval_sharding),
      # Replicated sums; predictions too, for the picture of process 0.
      out_shardings=sharding.replicated(mesh))
  run_eval = functools.partial(
      evaluate, eval_fn=eval_fn, task=exp.task, seeds=seeds,
      eval_batch_size=config.eval_batch_size, batch_sharding=eval_sharding)
  try:
    with _StopRequests() as stop:
      per_seed = _train_loop(
          config, workdir, exp=exp, seeds=seeds, state=state,
          train_fn=train_fn, run_eval=run_eval, manager=manager,
          batch_sharding=batch_sharding, stop=stop)
  finally:
    # Also on an exception: a save in flight completes (or fails loudly)
    # rather than being abandoned half-written.
    manager.wait_until_finished()
    manager.close()
  if per_seed is None:
    logging.info('Stopped by SIGTERM after saving; rerun the same command to '
                 'resume')
    return {}
  eval_metrics = mean_over_seeds(per_seed)
  if jax.process_index() == 0:
    dirs = [workdir] + (seed_dirs(workdir, seeds) if seeds.stacked else [])
    for path, metrics in zip(dirs, [eval_metrics] + per_seed):
      with open(os.path.join(path, FINAL_METRICS_FILE), 'w') as f:
        json.dump(metrics, f, indent=2, sort_keys=True)
  return eval_metrics


FINAL_METRICS_FILE = 'final_metrics.json'


def seed_dirs(workdir: str, seeds: Seeds) -> list[str]:
  """WORKDIR/seed_{value} for each seed: where stacked seeds' metrics go."""
  return [os.path.join(workdir, f'seed_{s}') for s in seeds.values]


def mean_over_seeds(per_seed: list[dict]) -> dict:
  """The mean of each metric over seeds (the metrics of a single seed)."""
  return {k: float(np.mean([m[k] for m in per_seed])) for k in per_seed[0]}


class _Writers:
  """The run's metric writer, plus one per seed when seeds are stacked (the
  run's then records the mean over seeds)."""

  def __init__(self, workdir: str, seeds: Seeds):
    self._run = metric_writers.MetricWriter(workdir)
    self._seeds = []
    if seeds.stacked:
      for path in seed_dirs(workdir, seeds):
        os.makedirs(path, exist_ok=True)
        self._seeds.append(metric_writers.MetricWriter(path))

  def write(self, step: int, per_seed: list[dict]) -> dict:
    """Writes each seed's metrics and their mean; returns the mean."""
    mean = mean_over_seeds(per_seed)
    self._run.write(step, mean)
    for writer, metrics in zip(self._seeds, per_seed):
      writer.write(step, metrics)
    return mean

  def close(self) -> None:
    for writer in [self._run, *self._seeds]:
      writer.close()


def _stop_if_diverged(state, step: int, limit: int, manager) -> None:
  """Raises UserError once `limit` steps in a row were non-finite."""
  streak = int(np.max(jax.device_get(state.nonfinite_streak)))
  if streak < limit:
    return
  manager.wait_until_finished()
  raise UserError(
      f'stopped at step {step}: the last {streak} steps had a non-finite loss '
      f'or gradient and were skipped (config.nonfinite.max_consecutive='
      f'{limit}); the newest checkpoint (step {manager.latest_step()}) holds '
      'the last good state. Lower the learning rate, clip gradients '
      '(optimizer.grad_clip_norm) or check the data, then rerun to resume')


class _StopRequests:
  """Turns SIGTERM (a preemption notice) into a request to save and stop.

  One process: a signal handler sets a flag, read after each step. Several:
  JAX's preemption service (started by `jax.distributed.initialize`) sees
  the notice on any host and makes every host agree on the step to stop at,
  so they all save the same checkpoint.
  """

  def __enter__(self):
    self._event = threading.Event()
    self._previous = None
    if (jax.process_count() == 1
        and threading.current_thread() is threading.main_thread()):
      self._previous = signal.signal(signal.SIGTERM,
                                     lambda *_: self._event.set())
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def requested(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._event.is_set()


def _train_loop(config, workdir, *, exp, seeds, state, train_fn, run_eval,
                manager, batch_sharding, stop) -> Optional[list[dict]]:
  """Steps from `state.step` to the end.

  Returns:
    The last eval metrics of each seed, or None if `stop` asked to stop
    early (the state is then saved at the step reached).
  """
  num_steps = exp.num_steps
  start_step = int(jax.device_get(state.step))
  if start_step >= num_steps:
    # A finished run has nothing to train; it reports its final evaluation.
    return run_eval(state)[0]
  writer = _Writers(workdir, seeds)
  progress = metric_writers.ProgressBar(num_steps, start_step,
                                        enabled=config.progress_bar)
  batches = seeds.batches(exp.task, global_batch_size=config.batch_size,
                          start_step=start_step)
  per_seed, eval_metrics = [], {}
  pending = []  # Device-side metrics since the last write; fetched together.
  last_time = time.perf_counter()
  try:
    for step in range(start_step + 1, num_steps + 1):
      state, step_metrics = train_fn(
          state, sharding.global_batch(next(batches), batch_sharding))
      pending.append(step_metrics)
      is_eval = step % config.eval_every_steps == 0 or step == num_steps
      is_save = is_eval or step % config.checkpoint.save_every_steps == 0
      is_log = step % config.log_every_steps == 0 or step == num_steps
      if is_log or is_save:
        # A host sync, so only at these steps; skipped updates never touch
        # the state, so nothing bad reaches a checkpoint meanwhile.
        _stop_if_diverged(state, step, config.nonfinite.max_consecutive,
                          manager)

      if is_log:
        now = time.perf_counter()
        # Each entry is [] or, for stacked seeds, [seeds].
        summary = {k: np.mean([m[k] for m in jax.device_get(pending)], axis=0)
                   for k in pending[0]}
        # All seeds' examples: the throughput of the program.
        rate = len(pending) * config.batch_size * seeds.count / (
            now - last_time)
        summary = writer.write(step, [
            {**m, 'train/examples_per_sec': rate}
            for m in seeds.unstack(summary)])
        progress.update(step, loss=summary['train/loss'],
                        examples_per_sec=summary['train/examples_per_sec'])
        pending, last_time = [], now

      if is_eval:
        per_seed, sums, first_batch = run_eval(state)
        eval_metrics = writer.write(step, per_seed)
        logging.info('step %d: eval accuracy %.4f, loss %.4f', step,
                     eval_metrics['eval/accuracy'], eval_metrics['eval/loss'])
        if config.write_plots and jax.process_index() == 0:
          _write_pictures(workdir, step=step, task=exp.task, sums=sums,
                          first_batch=first_batch)
        exp.task.write_samples(workdir, step=step, model=exp.model,
                               params=seeds.first_of(state.params),
                               samples_config=config.samples)
      if is_save:
        checkpointing.save(manager, state,
                           metrics=eval_metrics if is_eval else None)
        # Evaluation and saving are not training throughput.
        last_time = time.perf_counter()
      if stop.requested(step):
        if not is_save:
          _stop_if_diverged(state, step, config.nonfinite.max_consecutive,
                            manager)
          checkpointing.save(manager, state)
        logging.warning('SIGTERM: saved step %d and stopping', step)
        return None
  finally:
    writer.close()
    progress.close()
  return per_seed
