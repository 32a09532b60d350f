"""Checkpoints you can trust: damage to the newest checkpoint is caught.

Two checkpoints (steps 20 and 40, different values) of a small model's train
state (parameters, Adam moments, step, RNG) are written once per module;
each damage test ruins step 40 of a copy in one way and checks that
`restore_latest` returns step 20's values bitwise, warns naming the problem,
and moved step 40 aside rather than deleting it. Orbax alone catches most of
these, but not a flipped bit inside array data: that test first shows that
Orbax would have returned altered values.

Then the fingerprint itself (every single-bit flip changes it; it does not
depend on sharding), two processes that must agree, and the real training
entry point resuming past a damaged checkpoint.
"""

import glob
import json
import logging
import os
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from bigjax import checkpointing
from bigjax import train
from bigjax.errors import UserError
from tests import checkpoint_shardings
from tests.conftest import ROOT
from tests.test_train import restored_params, smoke_config

# Orbax abandons the coroutines of a read that failed, and Python reports
# them when they are collected. These tests make reads fail on purpose.
pytestmark = pytest.mark.filterwarnings(
    'ignore::pytest.PytestUnraisableExceptionWarning')

STEPS = (20, 40)
CONFIG = ml_collections.ConfigDict({'keep_latest': 3, 'keep_best': 1})


class _MLP(nn.Module):
  """784 -> 64 -> 10: a small model with a 200 KB kernel of random values."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(hidden)


def _state(step: int) -> checkpoint_shardings.State:
  """A train state with Adam moments, distinct for every `step`."""
  tx = optax.adam(1e-3)
  params = _MLP().init(jax.random.PRNGKey(step), jnp.zeros((1, 784)))['params']
  grads = jax.tree.map(lambda p: jnp.sin(p * step), params)
  _, opt_state = tx.update(grads, tx.init(params), params)
  return checkpoint_shardings.State(
      step=jnp.int32(step), params=params, opt_state=opt_state,
      rng=jax.random.PRNGKey(step + 1))


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def _bits(tree) -> list[bytes]:
  """Each leaf's raw bytes, so equality is bitwise (NaNs, -0.0 included)."""
  return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """A workdir holding checkpoints at STEPS, and {step: saved state}."""
  workdir = str(tmp_path_factory.mktemp('pristine'))
  states = {step: _state(step) for step in STEPS}
  with checkpointing.make_manager(workdir, CONFIG) as manager:
    for step in STEPS:
      checkpointing.save(manager, states[step],
                         metrics={checkpointing.BEST_METRIC: step / 100})
  return workdir, states


@pytest.fixture
def run(pristine, tmp_path):
  """A fresh copy of the pristine workdir: (workdir, states)."""
  workdir = str(tmp_path / 'run')
  shutil.copytree(pristine[0], workdir)
  return workdir, pristine[1]


def _step_dir(workdir, step):
  return os.path.join(checkpointing.checkpoint_dir(workdir), str(step))


def _largest_data_file(step_dir) -> str:
  """The biggest array-chunk file Orbax wrote (OCDBT data under `d/`)."""
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'),
                    recursive=True)
  return max(files, key=os.path.getsize)


def _restore(workdir, abstract_state):
  """(restore_latest's result, the steps left afterwards)."""
  with checkpointing.make_manager(workdir, CONFIG) as manager:
    state = checkpointing.restore_latest(manager, abstract_state)
    return state, manager.all_steps()


def _files(directory) -> list[str]:
  return sorted(os.path.relpath(p, directory) for p in
                glob.glob(os.path.join(directory, '**'), recursive=True))


def _restore_with_orbax_alone(workdir, step, abstract_state):
  """What plain Orbax returns for `step`, with no fingerprint check."""
  with ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir)) as m:
    return m.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))['state']


def _flip_a_bit_orbax_misses(workdir, step, saved):
  """Flips one bit in `step`'s array data where Orbax still decodes it.

  The data is zstd-compressed, so a flip may or may not decode; this tries
  bits spread over the largest data file and keeps the first one that
  Orbax restores without error but with altered values. Returns the paths
  of the arrays Orbax returned altered.
  """
  path = _largest_data_file(_step_dir(workdir, step))
  with open(path, 'rb') as f:
    original = f.read()
  for offset in range(len(original) // 2, len(original) - 64, 997):
    data = bytearray(original)
    data[offset] ^= 1 << (offset % 8)
    with open(path, 'wb') as f:
      f.write(data)
    try:
      got = _restore_with_orbax_alone(workdir, step, _abstract(saved))
    except Exception:  # pylint: disable=broad-except
      continue  # This flip broke decoding; Orbax caught it. Try another.
    altered = [jax.tree_util.keystr(p) for (p, a), b in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(saved))
               if np.asarray(a).tobytes() != np.asarray(b).tobytes()]
    if altered:
      return altered
  raise AssertionError('no single-bit flip decoded silently')


# ---- The ways of damaging step 40 --------------------------------------------
# Each returns a piece of the warning it must cause.


def flip_one_bit_in_array_data(workdir, states):
  altered = _flip_a_bit_orbax_misses(workdir, 40, states[40])
  # Orbax alone would have loaded wrong values without a word.
  assert altered
  return f'differ from their saved fingerprints: {altered[0]}'


def truncate_a_data_file(workdir, states):
  path = _largest_data_file(_step_dir(workdir, 40))
  os.truncate(path, os.path.getsize(path) // 2)
  return 'raised ValueError: OUT_OF_RANGE: Error reading "'


def delete_a_data_file(workdir, states):
  os.remove(_largest_data_file(_step_dir(workdir, 40)))
  return 'raised ValueError: '


def overwrite_a_data_file_with_garbage(workdir, states):
  path = _largest_data_file(_step_dir(workdir, 40))
  garbage = np.random.default_rng(0).bytes(os.path.getsize(path))
  with open(path, 'wb') as f:
    f.write(garbage)
  return 'ZSTD_decompressStream() failed'


def garble_the_tree_metadata(workdir, states):
  with open(os.path.join(_step_dir(workdir, 40), 'state', '_METADATA'),
            'wb') as f:
    f.write(b'\x82garbage')
  return 'raised UnicodeDecodeError'


def garble_the_ocdbt_manifest(workdir, states):
  path = os.path.join(_step_dir(workdir, 40), 'state', 'manifest.ocdbt')
  with open(path, 'r+b') as f:
    f.write(b'\0\0\0\0')
  return 'manifest.ocdbt'


def delete_the_step_metadata(workdir, states):
  os.remove(os.path.join(_step_dir(workdir, 40), '_CHECKPOINT_METADATA'))
  return '_CHECKPOINT_METADATA is missing or unreadable'


def delete_the_fingerprints(workdir, states):
  shutil.rmtree(os.path.join(_step_dir(workdir, 40), 'fingerprints'))
  return 'it has no fingerprint item'


def garble_the_fingerprints(workdir, states):
  with open(os.path.join(_step_dir(workdir, 40), 'fingerprints', 'metadata'),
            'w') as f:
    f.write('{"format": "bigjax-fingerprint-v1", "arr')
  return 'fingerprint item'


def alter_one_saved_fingerprint(workdir, states):
  """A readable record whose hash for one array is wrong."""
  path = os.path.join(_step_dir(workdir, 40), 'fingerprints', 'metadata')
  with open(path) as f:
    record = json.load(f)
  entry = record['arrays']['.rng']
  entry['fingerprint'] = entry['fingerprint'][::-1]
  with open(path, 'w') as f:
    json.dump(record, f)
  num_arrays = len(jax.tree.leaves(states[40]))
  return f'1 of {num_arrays} arrays differ from their saved fingerprints: .rng'


DAMAGES = [flip_one_bit_in_array_data, truncate_a_data_file,
           delete_a_data_file, overwrite_a_data_file_with_garbage,
           garble_the_tree_metadata, garble_the_ocdbt_manifest,
           delete_the_step_metadata, delete_the_fingerprints,
           garble_the_fingerprints, alter_one_saved_fingerprint]


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_falls_back_to_previous_and_moves_it_aside(
    run, damage, caplog):
  workdir, states = run
  expected_warning = damage(workdir, states)
  damaged_files = _files(_step_dir(workdir, 40))

  with caplog.at_level(logging.WARNING):
    restored, steps_left = _restore(workdir, _abstract(states[40]))

  assert _bits(restored) == _bits(states[20])
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any('step 40' in w and 'is damaged' in w and expected_warning in w
             for w in warnings), warnings
  # Moved aside, not deleted: the damaged files are all still there.
  moved = os.path.join(checkpointing.damaged_dir(workdir), '40')
  assert not os.path.exists(_step_dir(workdir, 40))
  assert steps_left == [20]
  assert _files(moved) == damaged_files


def test_resumed_run_saves_the_moved_step_again(run):
  workdir, states = run
  _flip_a_bit_orbax_misses(workdir, 40, states[40])
  with checkpointing.make_manager(workdir, CONFIG) as manager:
    restored = checkpointing.restore_latest(manager, _abstract(states[40]))
    assert int(restored.step) == 20
    checkpointing.save(manager, states[40])  # Step 40 again, intact.
  restored, steps = _restore(workdir, _abstract(states[40]))
  assert steps == [20, 40]
  assert _bits(restored) == _bits(states[40])
  # A second damaged step 40 does not overwrite the first one moved aside.
  _flip_a_bit_orbax_misses(workdir, 40, states[40])
  _restore(workdir, _abstract(states[40]))
  moved = sorted(os.listdir(checkpointing.damaged_dir(workdir)))
  assert moved == ['40', '40.1']


def test_empty_newer_step_directory_is_moved_aside(run, caplog):
  workdir, states = run
  os.makedirs(_step_dir(workdir, 60))
  with caplog.at_level(logging.WARNING):
    restored, steps = _restore(workdir, _abstract(states[40]))
  assert _bits(restored) == _bits(states[40])
  assert steps == [20, 40]
  assert 'step 60' in caplog.text and 'no fingerprint item' in caplog.text
  assert os.path.isdir(os.path.join(checkpointing.damaged_dir(workdir), '60'))


def test_leftover_temporary_directory_is_ignored(run, caplog):
  """An interrupted save leaves a temporary directory Orbax never lists."""
  workdir, states = run
  tmp = _step_dir(workdir, 60) + '.orbax-checkpoint-tmp-1234567890'
  shutil.copytree(_step_dir(workdir, 40), tmp)
  os.remove(_largest_data_file(tmp))
  with caplog.at_level(logging.WARNING):
    restored, steps = _restore(workdir, _abstract(states[40]))
  assert _bits(restored) == _bits(states[40])
  assert steps == [20, 40]
  assert 'damaged' not in caplog.text
  assert os.path.isdir(tmp)  # Not ours to delete either.


def test_all_damaged_raises_user_error_and_moves_nothing(run):
  workdir, states = run
  for step in STEPS:
    path = _largest_data_file(_step_dir(workdir, step))
    os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(UserError, match=r'no checkpoint in .*checkpoints '
                     r'verifies \(steps 40, 20 damaged.*--workdir'):
    _restore(workdir, _abstract(states[40]))
  assert not os.path.exists(checkpointing.damaged_dir(workdir))
  assert all(os.path.isdir(_step_dir(workdir, s)) for s in STEPS)


def test_checkpoints_without_fingerprints_are_refused(tmp_path):
  """Checkpoints written before fingerprints existed cannot be verified."""
  workdir = str(tmp_path)
  with checkpointing.make_manager(workdir, CONFIG) as manager:
    for step in STEPS:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state(step))), force=True)
  with pytest.raises(UserError, match=r'\(steps 40, 20\) carry no content '
                     'fingerprints'):
    _restore(workdir, _abstract(_state(40)))
  assert all(os.path.isdir(_step_dir(workdir, s)) for s in STEPS)


def test_other_config_is_a_user_error_not_damage(run):
  workdir, states = run
  wider = jax.tree.map(lambda x: x, _abstract(states[40]))
  kernel = wider.params['Dense_1']['kernel']
  wider.params['Dense_1']['kernel'] = jax.ShapeDtypeStruct(
      (64, 12), kernel.dtype, sharding=kernel.sharding)
  with pytest.raises(UserError, match=r"\.params\['Dense_1'\]\['kernel'\] is "
                     r'float32\[64, 10\] there but float32\[64, 12\]'):
    _restore(workdir, wider)
  assert not os.path.exists(checkpointing.damaged_dir(workdir))


def test_no_checkpoint_gives_none(tmp_path):
  assert _restore(str(tmp_path), _abstract(_state(0)))[0] is None


# ---- The fingerprint itself --------------------------------------------------


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16', 'int8',
                                   'uint32', 'bool'])
def test_every_single_bit_flip_changes_the_fingerprint(dtype):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 5)) * 10).astype(dtype)
  words = np.asarray(x).view(f'u{x.dtype.itemsize}')
  num_bits = 1 if dtype == 'bool' else 8 * x.dtype.itemsize
  # Every (element, bit) flip, as one batch [elements * bits, 3, 5].
  flips = np.repeat(words[None], words.size * num_bits, axis=0).reshape(
      words.size * num_bits, -1)
  element, bit = np.divmod(np.arange(len(flips)), num_bits)
  flips[np.arange(len(flips)), element] ^= (1 << bit).astype(words.dtype)
  flipped = jnp.asarray(flips.view(x.dtype).reshape(-1, *x.shape))
  base = checkpointing._array_fingerprint(x)
  hashes = np.asarray(jax.vmap(checkpointing._array_fingerprint)(flipped))
  assert not np.any(np.all(hashes == np.asarray(base), axis=1))
  # Each stream alone catches every flip too.
  assert np.all(hashes != np.asarray(base))


def test_sign_flips_swaps_and_zeroing_change_the_fingerprint():
  """Changes an odd-weighted sum of raw words would miss or be weak on."""
  x = jnp.asarray(np.random.default_rng(1).normal(size=(64,)), jnp.float32)
  base = checkpointing.array_fingerprints({'x': x})["['x']"]
  two_signs = x.at[3].multiply(-1).at[17].multiply(-1)
  swapped = x.at[3].set(x[17]).at[17].set(x[3])
  zeroed = x.at[8:16].set(0)
  for changed in (two_signs, swapped, zeroed, x.reshape(8, 8).T.reshape(64)):
    assert checkpointing.array_fingerprints({'x': changed})["['x']"] != base


def test_fingerprints_cover_keys_and_wide_types():
  tree = {'key': jax.random.key(0), 'raw_key': jax.random.PRNGKey(0),
          'complex': jnp.asarray([1 + 2j, 3 - 4j], jnp.complex64),
          'empty': jnp.zeros((0, 3))}
  got = checkpointing.array_fingerprints(tree)
  assert sorted(got) == ["['complex']", "['empty']", "['key']", "['raw_key']"]
  assert all(len(v) == 16 for v in got.values())
  # A typed key hashes as its raw key data.
  assert got["['key']"] == got["['raw_key']"]
  assert got["['empty']"] == '0' * 16
  changed = tree['complex'].at[1].set(3 + 4j)
  assert checkpointing.array_fingerprints({'complex': changed})["['complex']"] \
      != got["['complex']"]


def _helper(*args, devices: int) -> subprocess.Popen:
  """tests/checkpoint_shardings.py in a process with `devices` CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'checkpoint_shardings.py'),
       *map(str, args)], env=env, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict | None:
  """The JSON line a helper printed last (None if it printed none)."""
  try:
    out, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()  # A hang, e.g. processes stuck in different collectives.
    out, err = proc.communicate()
  assert proc.returncode == 0, err[-3000:]
  lines = out.strip().splitlines()
  return json.loads(lines[-1]) if lines and lines[-1].startswith('{') else None


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_fingerprints_do_not_depend_on_sharding(tmp_path):
  """Same arrays on 1 device, replicated on 8, split 8 ways and 2x4: same
  fingerprints as here; a checkpoint saved 8-way split restores verified
  onto a 2x4 mesh, replicated and one device."""
  result = _result(_helper('meshes', tmp_path / 'run', devices=8))
  here = checkpointing.array_fingerprints(
      {k: jnp.asarray(v) for k, v in checkpoint_shardings.arrays().items()})
  assert len(result['fingerprints']) == 6
  for layout, fingerprints in result['fingerprints'].items():
    assert fingerprints == here, layout
  assert result['restored'] == {'split_2x4': True, 'replicated_8': True,
                                'single_device': True}
  assert "P('x', 'y')" in result['restored_shardings']['split_2x4']


def test_two_processes_fall_back_together_when_only_one_fails_to_read(
    tmp_path):
  """2 processes x 2 devices, state split over all 4. Step 40 loses data
  that only process 1 reads: process 1's restore raises, process 0's does
  not, yet both skip step 40 and restore step 20 (no hang, no split)."""
  workdir = tmp_path / 'run'

  def both(phase):
    port = _free_port()
    procs = [_helper('two_processes', phase, workdir, port, i, devices=2)
             for i in range(2)]
    return [_result(p) for p in procs]

  both('save')
  files = glob.glob(os.path.join(_step_dir(str(workdir), 40), 'state',
                                 'ocdbt.process_1', 'd', '*'))
  path = max(files, key=os.path.getsize)
  os.truncate(path, os.path.getsize(path) // 2)
  first, second = both('restore')

  for result in (first, second):
    assert result['step'] == 20 and result['equal_to_step_20'], result
    assert result['steps_left'] == [20] and result['moved'], result
  assert 'failed on process(es) [1]' in first['warnings'][0]
  assert 'OUT_OF_RANGE' in second['warnings'][0]


def test_saving_writes_one_fingerprint_per_array(run):
  workdir, states = run
  path = os.path.join(_step_dir(workdir, 40), 'fingerprints', 'metadata')
  with open(path) as f:
    record = json.load(f)
  assert record['format'] == checkpointing.FINGERPRINT_FORMAT
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(states[40])]
  assert sorted(record['arrays']) == sorted(paths)
  kernel = record['arrays'][".params['Dense_0']['kernel']"]
  assert kernel['shape'] == [784, 64] and kernel['dtype'] == 'float32'


# ---- Through the real entry point --------------------------------------------


def test_training_resumes_from_previous_checkpoint_when_newest_is_damaged(
    fake_data_dir, tmp_path, caplog):
  """A finished run whose last checkpoint (step 8) has a flipped bit: the
  rerun warns, resumes from step 4, trains to 8 again and saves it."""
  config = smoke_config(fake_data_dir, write_plots=False, num_train_steps=8,
                        eval_every_steps=4, log_every_steps=4,
                        **{'checkpoint.save_every_steps': 4})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  want = restored_params(workdir, 8)
  with ocp.CheckpointManager(checkpointing.checkpoint_dir(workdir)) as m:
    assert m.all_steps() == [4, 8]
    saved = m.restore(8)['state']
  _flip_a_bit_orbax_misses(workdir, 8, saved)

  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)

  assert 'Checkpoint step 8' in caplog.text
  assert 'differ from their saved fingerprints' in caplog.text
  assert 'Resuming from step 4' in caplog.text
  assert os.path.isdir(os.path.join(checkpointing.damaged_dir(workdir), '8'))
  # Retrained from step 4, it ends bitwise where the first run ended.
  jax.tree.map(np.testing.assert_array_equal, restored_params(workdir, 8),
               want)
