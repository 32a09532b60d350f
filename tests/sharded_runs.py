r"""Runs the tiny sharding configs on however many devices this process has.

Used by tests/test_sharding.py in a subprocess of its own, because the number
of (simulated) devices is fixed when JAX starts:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m tests.sharded_runs --data_dir=D --root=R --out=OUT.json \
      --mesh=2,2,2 --preset=fsdp_tensor --models=cnn,lstm,vit [--bytes]

For each model it trains 10 steps through `train.train_and_evaluate` on the
given mesh, then reads back the actual `.sharding.spec` of every parameter
(after a fresh jitted init, and after restoring the last checkpoint, whose
whole state it also writes to ROOT/NAME_MESH_PRESET.npz) and the bytes each
device holds. With --restore_only it just restores and writes those. With --bytes it also initialises each model fully
sharded over all devices ('fsdp' preset, fsdp=N) and replicated, and reports
the largest per-device bytes of each. Results go to one JSON file.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import json  # noqa: E402
import os  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from bigjax import metric_writers  # noqa: E402
from bigjax import sharding  # noqa: E402
from bigjax import train  # noqa: E402
from bigjax.models import axes  # noqa: E402
from tests import sharding_configs  # noqa: E402

_DATA_DIR = flags.DEFINE_string('data_dir', None, 'TFDS data_dir.', required=True)
_ROOT = flags.DEFINE_string('root', None, 'Directory for workdirs.', required=True)
_OUT = flags.DEFINE_string('out', None, 'JSON output path.', required=True)
_MESH = flags.DEFINE_string('mesh', '-1,1,1', 'data,fsdp,tensor sizes.')
_PRESET = flags.DEFINE_string('preset', 'fsdp_tensor', 'Sharding preset.')
_MODELS = flags.DEFINE_list('models', 'cnn,lstm,vit', 'sharding_configs names.')
_BYTES = flags.DEFINE_bool('bytes', False, 'Also measure FSDP vs replicated.')
_RESTORE_ONLY = flags.DEFINE_bool(
    'restore_only', False, 'Only restore each model\'s final checkpoint from '
    'ROOT/NAME (written by an earlier run, on any mesh) onto --mesh.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None, 'Multi-process.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Multi-process.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'Multi-process.')


def _with_paths(tree) -> list:
  return [(axes.path_text(path), leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def actual_specs(params) -> dict[str, str]:
  """{param path: the PartitionSpec text} of live arrays."""
  return {path: sharding.spec_text(leaf.sharding.spec, leaf.ndim)
          for path, leaf in _with_paths(params)}


def max_device_bytes(tree) -> int:
  """The most bytes any one device holds of a tree of live arrays."""
  per_device = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + (
          shard.data.nbytes)
  return max(per_device.values())


def save_state(state, path) -> None:
  """The whole state as NumPy arrays (gathered), keyed by tree path."""
  leaves = jax.tree_util.tree_leaves_with_path(jax.device_get(state))
  np.savez(path, **{axes.path_text(p): np.asarray(x) for p, x in leaves})


def main(argv):
  del argv
  platform.initialize_distributed(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  data, fsdp, tensor = map(int, _MESH.value.split(','))
  results = {'num_devices': jax.device_count(), 'models': {}}
  for name in _MODELS.value:
    config = sharding_configs.get_config(name, _DATA_DIR.value)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    config.sharding_preset = _PRESET.value
    workdir = os.path.join(_ROOT.value, name)
    tag = f'{data}x{fsdp}x{tensor}_{_PRESET.value}'
    if _RESTORE_ONLY.value:
      _, state, _ = train.load_state(config, workdir)
      results['models'][name] = {'step': int(jax.device_get(state.step)),
                                 'restored_specs': actual_specs(state.params)}
      save_state(state, os.path.join(_ROOT.value, f'{name}_{tag}.npz'))
      continue
    # Before training: the jitted init's outputs, born sharded.
    _, state, _ = train.load_state(
        config, os.path.join(_ROOT.value, name + '_init'))
    init_specs = actual_specs(state.params)
    train.train_and_evaluate(config, workdir)
    # After training: the final checkpoint restored onto the same layout.
    _, state, shardings = train.load_state(config, workdir)
    history = metric_writers.read_history(workdir)
    save_state(state, os.path.join(_ROOT.value, f'{name}_{tag}.npz'))
    results['models'][name] = {
        'losses': [r['train/loss'] for r in history if 'train/loss' in r],
        'step': int(jax.device_get(state.step)),
        'init_specs': init_specs,
        'restored_specs': actual_specs(state.params),
        'rule_specs': {
            path: sharding.spec_text(s.spec, leaf.ndim)
            for (path, s), leaf in zip(_with_paths(shardings.params),
                                       jax.tree.leaves(state.params))},
    }
    if _BYTES.value:
      layouts = {}
      for preset, mesh in (('fsdp', (1, -1, 1)), ('data_parallel', (-1, 1, 1))):
        config.sharding_preset = preset
        config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
        _, state, _ = train.load_state(
            config, os.path.join(_ROOT.value, f'{name}_{preset}'))
        layouts[preset] = max_device_bytes(
            {'params': state.params, 'opt_state': state.opt_state})
      results['models'][name]['bytes'] = layouts
  if jax.process_index() == 0:
    with open(_OUT.value, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  app.run(main)
