"""Orbax checkpoints of the whole train state, keeping the latest and the best.

Layout: `WORKDIR/checkpoints/<step>/state/...`, one directory per step, written
atomically by Orbax (an unfinished save never counts as a checkpoint).

Which checkpoints stay: the newest `keep_latest` and the best `keep_best` by
`BEST_METRIC`. Orbax's plain `max_to_keep` together with a `best_fn` can
delete the newest checkpoint, so both sets are preserved explicitly by a
preservation policy instead.
"""

import os

import jax
import orbax.checkpoint as ocp

# Ranks checkpoints for keep_best; saves without metrics are never "best".
BEST_METRIC = 'eval/accuracy'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, checkpoint_config) -> ocp.CheckpointManager:
  """A CheckpointManager over `WORKDIR/checkpoints` with our keep policy."""
  pp = ocp.checkpoint_managers.preservation_policy
  policies = [pp.LatestN(n=checkpoint_config.keep_latest)]
  if checkpoint_config.keep_best > 0:
    policies.append(pp.BestN(
        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
        n=checkpoint_config.keep_best,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=pp.AnyPreservationPolicy(policies),
      # The loop decides when to save; Orbax should not skip any of them.
      save_decision_policy=ocp.checkpoint_managers.ContinuousCheckpointingPolicy(),
      enable_async_checkpointing=True,
      create=True)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options)


def save(manager: ocp.CheckpointManager, state, *, metrics=None) -> None:
  """Starts an async save of `state` at `state.step` (with eval metrics)."""
  step = int(jax.device_get(state.step))
  if metrics is not None:
    # Orbax keeps the metrics as JSON beside the checkpoint: plain floats only.
    metrics = {k: float(v) for k, v in metrics.items()}
  manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
               metrics=metrics, force=True)


def restore_latest(manager: ocp.CheckpointManager, abstract_state):
  """The newest checkpoint restored onto `abstract_state`'s shardings, or None.

  Args:
    manager: from `make_manager`.
    abstract_state: the train state as `jax.ShapeDtypeStruct`s carrying the
      target shardings, so arrays are restored straight onto their devices.
  """
  step = manager.latest_step()
  if step is None:
    return None
  restored = manager.restore(
      step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
  return restored.state
