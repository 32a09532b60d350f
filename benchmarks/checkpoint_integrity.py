r"""What content fingerprints add to the time of saving a checkpoint.

  python -m benchmarks.checkpoint_integrity \
      [--configs=cnn_fashion_mnist,vit_fashion_mnist] [--synthetic_mb=400] \
      [--saves=15] [--root=/tmp/bigjax_benchmarks] [--json=results.json]

For each state (the parameters and optimiser state that configs in configs/
build, default variants, and a synthetic state of --synthetic_mb MB of
float32), saves it --saves times the way bigjax saves (`checkpointing.save`:
fingerprints, then an async Orbax save of state and fingerprints) and as
many times without fingerprints (the state item alone), alternating the two
so that load from other processes hits both alike. After one unmeasured warm-up save each (it
compiles the fingerprint function), it reports medians of:

  blocking: the time `save()` takes, which the training loop waits for;
  committed: `save()` plus `wait_until_finished()`, until the checkpoint is
    on disk, which is what "save time" means here;
  fingerprint: `checkpointing.fingerprint_record` alone (the hashing);
  compile: compiling the fingerprint function for this state, paid once per
    process at its first save (or restore).

The overhead is committed-with over committed-without, minus one, from the
medians; 'paired' is the median over iterations of the same ratio for the
two saves made back to back, which drifts in machine load affect less; and
'hashing share' is fingerprint over committed-without: the part of the
overhead that is hashing, free of the noise of two disk-bound timings.
"""

from bigjax import platform

platform.set_cpu_xla_flags()

import functools  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
import flax  # noqa: E402
import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402

from benchmarks import report  # noqa: E402
from bigjax import checkpointing  # noqa: E402
from bigjax import config_validation  # noqa: E402
from bigjax import optimizers  # noqa: E402

_CONFIGS = flags.DEFINE_list(
    'configs', ['cnn_fashion_mnist', 'vit_fashion_mnist'],
    'Configs (modules in configs/) whose train states are saved.')
_SYNTHETIC_MB = flags.DEFINE_integer(
    'synthetic_mb', 400, 'Size of the synthetic float32 state; 0 skips it.')
_SAVES = flags.DEFINE_integer('saves', 15, 'Measured saves per variant.')
_ROOT = flags.DEFINE_string('root', '/tmp/bigjax_benchmarks',
                            'Parent folder of the temporary checkpoints.')
_JSON = flags.DEFINE_string('json', None, 'Also write the records here.')

# Fashion-MNIST, which every config here trains on.
IMAGE_SHAPE = (28, 28, 1)


@flax.struct.dataclass
class BenchState:
  """What a checkpoint's size is made of: parameters and optimiser state.

  Its own class rather than bigjax.train.TrainState, so the benchmark does
  not change whenever TrainState gains a field; `checkpointing.save` only
  needs `step`.
  """
  step: jax.Array
  params: Any
  opt_state: Any


def config_state(config_name: str) -> BenchState:
  """The fresh parameters and optimiser state of configs/`config_name`.py."""
  config = importlib.import_module(f'configs.{config_name}').get_config()
  model_cls, kwargs = config_validation.model_class_and_kwargs(config.model)
  tx = optimizers.make_optimizer(
      config.optimizer, optimizers.make_schedule(config.optimizer, 1000))

  @jax.jit
  def init(rng):
    variables = model_cls(**kwargs).init(
        rng, jnp.zeros((1, *IMAGE_SHAPE)), train=False)
    params = nn.unbox(variables)['params']
    return BenchState(step=jnp.int32(0), params=params,
                      opt_state=tx.init(params))
  return init(jax.random.PRNGKey(0))


def synthetic_state(megabytes: int) -> BenchState:
  """8 random float32 [rows, 3072] kernels, `megabytes` MB in all."""
  rows = max(1, megabytes * 2**20 // (8 * 3072 * 4))
  keys = jax.random.split(jax.random.PRNGKey(0), 8)
  params = {f'kernel_{i}': jax.random.normal(k, (rows, 3072), jnp.float32)
            for i, k in enumerate(keys)}
  return BenchState(step=jnp.int32(0), params=params, opt_state=())


def _save_without_fingerprints(manager, state):
  """How bigjax saved before fingerprints: the state item alone."""
  manager.save(int(state.step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(state)), force=True)


def _timed(save_fn, manager, state) -> tuple[float, float]:
  """(blocking seconds, committed seconds) of one save."""
  start = time.perf_counter()
  save_fn(manager, state)
  blocking = time.perf_counter() - start
  manager.wait_until_finished()
  return blocking, time.perf_counter() - start


def benchmark(name: str, state, root: str) -> dict:
  config = ml_collections.ConfigDict({'keep_latest': 2, 'keep_best': 0})
  variants = {'with': checkpointing.save, 'without': _save_without_fingerprints}
  managers = {v: checkpointing.make_manager(os.path.join(root, name, v), config)
              for v in variants}
  times = {v: {'blocking': [], 'committed': []} for v in variants}
  start = time.perf_counter()
  leaves = jax.tree.leaves(state)
  checkpointing._fingerprint_leaves.lower(leaves).compile()  # pylint: disable=protected-access
  compile_s = time.perf_counter() - start
  for i in range(_SAVES.value + 1):
    state = state.replace(step=jnp.int32(i))
    # Alternate which variant goes first, so neither always follows the other.
    for variant in sorted(variants, reverse=i % 2 == 1):
      blocking, committed = _timed(variants[variant], managers[variant], state)
      if i > 0:  # The first save of each variant warms up.
        times[variant]['blocking'].append(blocking)
        times[variant]['committed'].append(committed)
  for manager in managers.values():
    manager.close()
  hashing = []
  for _ in range(_SAVES.value):
    start = time.perf_counter()
    checkpointing.fingerprint_record(state)  # What save() adds, JSON aside.
    hashing.append(time.perf_counter() - start)
  med = {v: {k: statistics.median(t) for k, t in d.items()}
         for v, d in times.items()}
  return {
      'state': name,
      'megabytes': round(sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20,
                         1),
      'arrays': len(jax.tree.leaves(state)),
      'saves': _SAVES.value,
      'committed_s_without': round(med['without']['committed'], 4),
      'committed_s_with': round(med['with']['committed'], 4),
      'overhead': round(med['with']['committed'] / med['without']['committed']
                        - 1, 4),
      'overhead_paired': round(statistics.median(
          w / wo - 1 for w, wo in zip(times['with']['committed'],
                                      times['without']['committed'])), 4),
      'blocking_s_without': round(med['without']['blocking'], 4),
      'blocking_s_with': round(med['with']['blocking'], 4),
      'fingerprint_s': round(statistics.median(hashing), 4),
      'hashing_share': round(statistics.median(hashing)
                             / med['without']['committed'], 4),
      'compile_s': round(compile_s, 3),
      'devices': f'{jax.device_count()} x {jax.devices()[0].platform}',
  }


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  os.makedirs(_ROOT.value, exist_ok=True)
  root = tempfile.mkdtemp(prefix='checkpoint_integrity_', dir=_ROOT.value)
  states = [(name, functools.partial(config_state, name))
            for name in _CONFIGS.value]
  if _SYNTHETIC_MB.value > 0:
    states.append((f'synthetic_{_SYNTHETIC_MB.value}mb',
                   functools.partial(synthetic_state, _SYNTHETIC_MB.value)))
  records = []
  try:
    for name, make in states:
      record = benchmark(name, make(), root)
      print(json.dumps(record), flush=True)
      records.append(record)
  finally:
    shutil.rmtree(root)  # Only the folder this run created.
  report.write(records, [
      ('state', lambda r: r['state']),
      ('size', lambda r: f"{r['megabytes']:,.1f} MB"),
      ('arrays', lambda r: str(r['arrays'])),
      ('save, no fingerprints', lambda r: f"{r['committed_s_without']:.3f} s"),
      ('save, fingerprints', lambda r: f"{r['committed_s_with']:.3f} s"),
      ('overhead', lambda r: f"{100 * r['overhead']:+.1f}%"),
      ('paired', lambda r: f"{100 * r['overhead_paired']:+.1f}%"),
      ('blocking without / with', lambda r: (
          f"{r['blocking_s_without']:.3f} / {r['blocking_s_with']:.3f} s")),
      ('fingerprint alone', lambda r: f"{r['fingerprint_s']:.3f} s"),
      ('hashing share', lambda r: f"{100 * r['hashing_share']:.1f}%"),
      ('compile (once)', lambda r: f"{r['compile_s']:.2f} s"),
  ], json_path=_JSON.value, title=(
      f'Checkpoint save time with and without content fingerprints (median '
      f'of {_SAVES.value} saves, until committed to disk)'))


if __name__ == '__main__':
  app.run(main)
