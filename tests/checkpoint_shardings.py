r"""Fingerprints and verified restores across shardings and processes.

tests/test_checkpointing.py runs this in subprocesses, since a process's
number of (simulated) devices is fixed when JAX starts. Two modes:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python tests/checkpoint_shardings.py meshes WORKDIR

prints one JSON object:
  'fingerprints': {layout: {path: 16 hex digits}} for the same arrays
    placed on one device, replicated over 8, split 8 ways, split over a 2x4
    mesh (Auto and Explicit axes) and split over one axis of it;
  'restored': {layout: bool}: whether a checkpoint saved from the 8-way split
    restored bitwise onto that layout, and 'restored_shardings' the
    sharding the restored arrays landed on.

  XLA_FLAGS=--xla_force_host_platform_device_count=2 \
      python tests/checkpoint_shardings.py two_processes PHASE WORKDIR PORT ID

is one of two processes (ID 0 and 1, coordinator on 127.0.0.1:PORT). PHASE
'save' writes steps 20 and 40 of a state split over their 4 devices; the
test then damages step 40, and PHASE 'restore' (two fresh processes, as
after a restart) restores. Each restoring process prints {'process', 'step',
'equal_to_step_20', 'steps_left', 'moved', 'warnings'}.
"""

import json
import logging
import os
import sys
from typing import Any

import flax
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@flax.struct.dataclass
class State:
  """Shaped like bigjax.train.TrainState; checkpointing only needs `step`.

  Its own class, so these tests do not change whenever TrainState gains a
  field.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def arrays() -> dict[str, np.ndarray]:
  """Arrays of each dtype family a train state may hold; every non-scalar
  dimension divides by 8 or by the 2x4 mesh."""
  import ml_dtypes
  rng = np.random.default_rng(0)
  return {
      'f32': rng.normal(size=(16, 24)).astype(np.float32),
      'bf16': rng.normal(size=(8, 16)).astype(ml_dtypes.bfloat16),
      'f16_1d': rng.normal(size=(32,)).astype(np.float16),
      'int8': rng.integers(-128, 128, size=(16, 8)).astype(np.int8),
      'uint32': rng.integers(0, 2**32, size=(8, 4), dtype=np.uint32),
      'bool': rng.random(size=(8, 8)) < 0.5,
      'step': np.int32(1234),
  }


def _as_state(tree, step) -> State:
  """A State holding `tree` as its params (and uint32 words as rng);
  `step` is an int32 [] array."""
  return State(step=step, params=tree, opt_state=(), rng=tree['uint32'])


def _manager(workdir):
  import ml_collections
  from bigjax import checkpointing
  config = ml_collections.ConfigDict({'keep_latest': 3, 'keep_best': 0})
  return checkpointing.make_manager(workdir, config)


def _same_bits(restored, host) -> bool:
  """Whether this process's shards of `restored` hold `host`'s bits."""
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(host)):
    for shard in got.addressable_shards:
      if (np.asarray(shard.data).tobytes()
          != np.asarray(want)[shard.index].tobytes()):
        return False
  return True


def meshes(workdir: str) -> None:
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from bigjax import checkpointing

  assert jax.device_count() == 8, jax.devices()
  mesh8 = jax.make_mesh((8,), ('a',), axis_types=(AxisType.Auto,))
  mesh24 = jax.make_mesh((2, 4), ('x', 'y'), axis_types=(AxisType.Auto,) * 2)
  mesh24e = jax.make_mesh((2, 4), ('x', 'y'),
                          axis_types=(AxisType.Explicit,) * 2)

  def spec(ndim, per_ndim):
    return P() if ndim == 0 else per_ndim[ndim]

  layouts = {
      'single_device': lambda x: jax.sharding.SingleDeviceSharding(
          jax.devices()[0]),
      'replicated_8': lambda x: NamedSharding(mesh8, P()),
      'split_8': lambda x: NamedSharding(
          mesh8, spec(x.ndim, {1: P('a'), 2: P('a', None)})),
      'split_2x4': lambda x: NamedSharding(
          mesh24, spec(x.ndim, {1: P(('x', 'y')), 2: P('x', 'y')})),
      'split_2x4_explicit': lambda x: NamedSharding(
          mesh24e, spec(x.ndim, {1: P(('y', 'x')), 2: P('y', 'x')})),
      'split_over_y_only': lambda x: NamedSharding(
          mesh24, spec(x.ndim, {1: P('y'), 2: P(None, 'y')})),
  }
  host = arrays()
  fingerprints = {}
  for name, place in layouts.items():
    tree = {k: jax.device_put(v, place(v)) for k, v in host.items()}
    fingerprints[name] = checkpointing.array_fingerprints(tree)

  # A state saved from the 8-way split, restored onto other layouts.
  saved = _as_state({k: jax.device_put(v, layouts['split_8'](v))
                     for k, v in host.items()}, step=jax.numpy.int32(1))
  manager = _manager(workdir)
  checkpointing.save(manager, saved)
  manager.wait_until_finished()
  restored, restored_shardings = {}, {}
  for name in ('split_2x4', 'replicated_8', 'single_device'):
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                       sharding=layouts[name](x)), saved)
    state = checkpointing.restore_latest(manager, abstract)
    restored[name] = _same_bits(state, saved)
    restored_shardings[name] = str(state.params['f32'].sharding)
  manager.close()
  print(json.dumps({'fingerprints': fingerprints, 'restored': restored,
                    'restored_shardings': restored_shardings}))


def two_processes(phase: str, workdir: str, port: int,
                  process_id: int) -> None:
  """One of two processes; `phase` 'save' writes steps 20 and 40, 'restore'
  (in fresh processes, as after a restart) restores the newest verified."""
  from bigjax import platform
  platform.initialize_distributed(
      coordinator_address=f'127.0.0.1:{port}', num_processes=2,
      process_id=process_id)
  from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
  from bigjax import checkpointing

  assert jax.device_count() == 4 and jax.local_device_count() == 2
  mesh = jax.make_mesh((4,), ('a',), axis_types=(AxisType.Auto,))

  def sharding(x):
    return NamedSharding(mesh, P() if x.ndim == 0 else P('a'))

  # Big enough that OCDBT keeps its chunks in data files rather than inline
  # in its b-tree nodes, so truncating process 1's data file hurts.
  big = np.random.default_rng(1).normal(size=(64, 2048)).astype(np.float32)
  host = {20: dict(arrays(), big=big)}
  host[40] = {k: v if k == 'step' else ~v if v.dtype == bool else v + 1
              for k, v in host[20].items()}
  if phase == 'save':
    manager = _manager(workdir)
    for step in (20, 40):
      placed = {k: jax.make_array_from_callback(
          np.shape(v), sharding(np.asarray(v)), lambda i, v=v: np.asarray(v)[i])
                for k, v in dict(host[step], step_array=np.int32(step)).items()}
      checkpointing.save(manager, _as_state(placed, placed.pop('step_array')))
    manager.close()  # Waits for the saves to commit.
    return

  warnings = []
  handler = logging.Handler(logging.WARNING)
  handler.emit = lambda record: warnings.append(record.getMessage())
  logging.getLogger('absl').addHandler(handler)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding(x)),
      _as_state(host[20], np.int32(20)))
  manager = _manager(workdir)
  state = checkpointing.restore_latest(manager, abstract)
  steps_left = list(manager.all_steps())
  manager.close()
  print(json.dumps({
      'process': process_id,
      'step': int(np.asarray(state.step.addressable_data(0))),
      'equal_to_step_20': _same_bits(state, _as_state(host[20],
                                                      np.int32(20))),
      'steps_left': steps_left,
      'moved': os.path.isdir(os.path.join(
          checkpointing.damaged_dir(workdir), '40')),
      'warnings': [w for w in warnings if 'damaged' in w],
  }))


if __name__ == '__main__':
  if sys.argv[1] == 'meshes':
    meshes(sys.argv[2])
  elif sys.argv[1] == 'two_processes':
    two_processes(sys.argv[2], sys.argv[3], int(sys.argv[4]),
                  int(sys.argv[5]))
  else:
    raise SystemExit(f'unknown mode {sys.argv[1]!r}')
