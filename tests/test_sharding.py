"""Logical-axis sharding: rule resolution, golden tables, and real meshes.

The multi-device tests run in subprocesses of their own, since a process's
number of (simulated) devices is fixed when JAX starts: 8 CPU devices for the
(data=2, fsdp=2, tensor=2) mesh, and two processes of 2 devices each talking
through gloo for the multi-process test. Their losses are compared with the
same configs trained here, in the main test process, on its one device.
"""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from bigjax import config_validation
from bigjax import losses
from bigjax import metric_writers
from bigjax import sharding
from bigjax import train
from bigjax.errors import UserError
from bigjax.models import axes
from tests import sharding_configs
from tests.conftest import ROOT

SIZES = {'data': 2, 'fsdp': 2, 'tensor': 4}


# ---- Rule resolution ---------------------------------------------------------


@pytest.mark.parametrize('names, shape, rules, want', [
    # The first rule whose axes divide the dimension wins.
    (('embed', 'mlp'), (64, 256), (('mlp', 'tensor'), ('embed', 'fsdp')),
     P('fsdp', 'tensor')),
    # 10 classes do not divide by 4: replicated rather than an error.
    (('mlp', 'classes'), (8, 10), (('classes', 'tensor'), ('mlp', 'fsdp')),
     P('fsdp', None)),
    # A dimension that cannot take 'tensor' falls back to the next rule.
    (('vocab',), (70,), (('vocab', 'tensor'), ('vocab', 'fsdp')), P('fsdp')),
    # An axis taken by an earlier dimension is not used twice.
    (('mlp', 'embed'), (8, 8), (('mlp', 'fsdp'), ('embed', 'fsdp')),
     P('fsdp', None)),
    # An explicit None stops the search: later rules do not apply.
    (('mlp',), (8,), (('mlp', None), ('mlp', 'tensor')), P(None)),
    # Several mesh axes on one dimension need their product to divide.
    (('batch', None), (8, 3), (('batch', ('data', 'fsdp')),),
     P(('data', 'fsdp'), None)),
    (('batch',), (6,), (('batch', ('data', 'fsdp')),), P(None)),
    # Unnamed dimensions and names without a rule stay whole.
    ((None, 'layers'), (8, 8), (('embed', 'fsdp'),), P(None, None)),
])
def test_logical_to_spec(names, shape, rules, want):
  assert sharding.logical_to_spec(names, shape, rules, SIZES) == want


@pytest.mark.parametrize('mesh, devices, want', [
    ({'data': -1, 'fsdp': 1, 'tensor': 1}, 8, {'data': 8, 'fsdp': 1, 'tensor': 1}),
    ({'data': 2, 'fsdp': -1, 'tensor': 2}, 8, {'data': 2, 'fsdp': 2, 'tensor': 2}),
    ({'data': 1, 'fsdp': 4, 'tensor': 2}, 8, {'data': 1, 'fsdp': 4, 'tensor': 2}),
])
def test_mesh_shape(mesh, devices, want):
  assert sharding.mesh_shape(mesh, devices) == want
  assert list(sharding.mesh_shape(mesh, devices)) == list(sharding.MESH_AXES)


@pytest.mark.parametrize('mesh, message', [
    ({'data': -1, 'fsdp': -1, 'tensor': 1}, 'more than one -1'),
    ({'data': -1, 'fsdp': 3, 'tensor': 1}, 'needs a multiple of 3 devices'),
    ({'data': 2, 'fsdp': 2, 'tensor': 1}, 'spans 4 devices but there are 8'),
    ({'data': 0, 'fsdp': -1, 'tensor': 1}, 'config.mesh.data=0'),
])
def test_bad_meshes_are_one_line_errors(mesh, message):
  with pytest.raises(UserError, match=message) as e:
    sharding.mesh_shape(mesh, 8)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('key, value, message', [
    ('sharding_preset', 'fsdp_tensr', "did you mean 'fsdp_tensor'"),
    ('sharding_rules', (('mpl', 'tensor'),), "logical axis 'mpl'"),
    ('sharding_rules', (('mlp', 'model'),), "maps 'mlp' to ['model']"),
    ('sharding_rules', ('mlp',), 'is not a pair'),
    ('mesh.tensor', 2, 'spans 2 devices but there are 1'),
])
def test_bad_sharding_configs_are_rejected(key, value, message):
  config = sharding_configs.get_config('cnn', '/nonexistent')
  config.mesh.data = 1 if key == 'mesh.tensor' else -1
  node, leaf = (config.mesh, 'tensor') if key == 'mesh.tensor' else (config, key)
  node[leaf] = value
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(
      ']', r'\]')) as e:
    config_validation.validate(config)
  assert '\n' not in str(e.value)


@pytest.mark.parametrize('mesh, preset, batch, ok', [
    ((-1, 1, 1), 'data_parallel', 12, False),  # 8 batch shards.
    ((2, 2, 2), 'fsdp_tensor', 12, True),      # 4: tensor devices share.
    ((1, -1, 1), 'fsdp', 12, False),           # FSDP splits the batch too.
])
def test_batch_must_divide_by_batch_shards(mesh, preset, batch, ok,
                                           monkeypatch):
  monkeypatch.setattr(jax, 'device_count', lambda: 8)
  config = sharding_configs.get_config('cnn', '/nonexistent')
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh
  config.sharding_preset = preset
  config.batch_size = batch
  config.eval_batch_size = 8
  if ok:
    config_validation.validate(config)
  else:
    with pytest.raises(UserError, match='config.batch_size=12 does not divide '
                       'by the number of batch shards'):
      config_validation.validate(config)


def test_optimizer_state_follows_its_parameters():
  """mu/nu of a masked, clipped AdamW take their parameter's spec."""
  params = {'dense': {'kernel': jnp.zeros((8, 4)), 'bias': jnp.zeros((4,))},
            'embed': {'embedding': jnp.zeros((16, 8))}}
  specs = {'dense': {'kernel': P('fsdp', 'tensor'), 'bias': P('tensor')},
           'embed': {'embedding': P('tensor', 'fsdp')}}
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-3, mask=losses.penalty_mask))
  opt_state = jax.eval_shape(tx.init, params)
  got = sharding.specs_like_params(opt_state, params, specs)
  adam = got[1][0]
  assert adam.mu == specs and adam.nu == specs
  assert adam.count == P()
  # The masked weight-decay state holds no arrays; every leaf has a spec.
  assert len(jax.tree.leaves(got)) == len(jax.tree.leaves(opt_state))


# ---- Golden tables -------------------------------------------------------------


def _boxed_params(name, data_dir):
  if name in sharding_configs.sequence_models():
    model, inputs = sharding_configs.sequence_models()[name]
    init = functools.partial(model.init, train=False)
    return jax.eval_shape(init, jax.random.PRNGKey(0), *inputs)['params']
  exp = train.build_experiment(sharding_configs.get_config(name, data_dir))
  return exp.abstract_variables['params']


GOLDEN = ('cnn', 'resnet', 'lstm', 'gru', 'vit', 'decoder_lm',
          'decoder_lm_untied', 'encoder_decoder', 'lm_classifier', 'rnn_lm',
          'rnn_seq2seq', 'rnn_seq2seq_dot')


@pytest.mark.parametrize('name', GOLDEN)
def test_golden_sharding_tables(name, fake_data_dir):
  """Every parameter is named, and resolves to the checked-in spec."""
  boxed = _boxed_params(name, fake_data_dir)
  unnamed = [axes.path_text(p) for p, leaf in
             jax.tree_util.tree_leaves_with_path(boxed, is_leaf=sharding.is_box)
             if not sharding.is_box(leaf)]
  assert not unnamed, f'parameters without logical axis names: {unnamed}'
  got = sharding_configs.table(boxed)
  path = sharding_configs.golden_path(name)
  if os.environ.get('BIGJAX_UPDATE_GOLDEN'):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      f.write(got)
  with open(path) as f:
    assert got == f.read(), f'{name}: sharding differs from {path}'


def test_golden_tables_shard_what_they_should():
  """Spot checks that the tables are right, not just unchanged."""
  cnn = sharding_configs.read_golden_specs('cnn')
  assert cnn['hidden/kernel'] == 'fsdp,tensor'  # Column-parallel hidden layer.
  assert cnn['head/kernel'] == 'tensor,-'       # Row-parallel; 10 classes whole.
  assert cnn['conv0/kernel'] == '-,-,-,tensor'  # 1 input channel stays whole.
  vit = sharding_configs.read_golden_specs('vit')
  assert vit['encoder/layers/attention/query/kernel'] == '-,fsdp,tensor,-'
  assert vit['encoder/layers/attention/out/kernel'] == '-,tensor,-,fsdp'
  assert vit['encoder/layers/mlp/wo/kernel'] == '-,tensor,fsdp'
  lstm = sharding_configs.read_golden_specs('lstm')
  assert lstm['rnn/layer0/forward/cell/kernel'] == 'fsdp,tensor'
  lm = sharding_configs.read_golden_specs('decoder_lm_untied')
  assert lm['embed/embedding'] == 'tensor,fsdp'
  assert lm['logits/kernel'] == 'fsdp,tensor'


# ---- Real meshes ---------------------------------------------------------------

MODELS = ('cnn', 'lstm', 'vit')


def _run(args, *, devices, env_extra=None, **popen):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             **(env_extra or {}))
  return subprocess.Popen([sys.executable, '-m', *args], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, **popen)


def _check(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-3000:]


def _one_device_losses(name, data_dir, workdir):
  """10 steps of model `name` on this process's single device."""
  assert jax.device_count() == 1
  config = sharding_configs.get_config(name, data_dir)
  train.train_and_evaluate(config, workdir)
  return [r['train/loss'] for r in metric_writers.read_history(workdir)
          if 'train/loss' in r]


def _assert_close(got, want, rtol=1e-5):
  assert len(got) == len(want) == 10
  for i, (g, w) in enumerate(zip(got, want)):
    assert abs(g - w) <= rtol * abs(w), (i, got, want)


@pytest.fixture(scope='module')
def eight_devices(fake_data_dir, tmp_path_factory):
  """Results of tests/sharded_runs.py on 8 devices, mesh (2, 2, 2)."""
  root = tmp_path_factory.mktemp('eight_devices')
  out = root / 'out.json'
  _check(_run(['tests.sharded_runs', f'--data_dir={fake_data_dir}',
               f'--root={root}', f'--out={out}', '--mesh=2,2,2',
               '--preset=fsdp_tensor', f'--models={",".join(MODELS)}',
               '--bytes'], devices=8))
  with open(out) as f:
    return dict(json.load(f), root=str(root), data=fake_data_dir)


def test_written_out_backward_passes_partition_correctly():
  """The custom VJPs (fused LSTM, blocked and chunked attention, LayerNorm)
  on 4 meshes of 8 devices: their gradients equal one device's
  (tests/mesh_gradients.py).
  The LSTM's first form failed this (40% off); the training test below saw
  only a 4e-5 difference in the loss."""
  proc = _run(['tests.mesh_gradients'], devices=8)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  assert out.count('max relative difference') == 24, out[-3000:]


@pytest.mark.parametrize('name', MODELS)
def test_eight_device_mesh_matches_one_device(name, eight_devices,
                                              fake_data_dir, tmp_path):
  """(data=2, fsdp=2, tensor=2) trains like one device, laid out as the
  golden table says."""
  assert eight_devices['num_devices'] == 8
  run = eight_devices['models'][name]
  _assert_close(run['losses'],
                _one_device_losses(name, fake_data_dir, str(tmp_path)))
  assert run['step'] == 10
  golden = sharding_configs.read_golden_specs(name)
  assert run['rule_specs'] == golden
  assert run['init_specs'] == golden       # Born sharded by the jitted init.
  assert run['restored_specs'] == golden   # And restored onto the same layout.
  assert any('tensor' in s for s in golden.values())
  assert any('fsdp' in s for s in golden.values())


def _load(path):
  with np.load(path) as f:
    return dict(f)


def test_checkpoints_restore_onto_other_meshes(eight_devices, tmp_path):
  """Saved from (data=2, fsdp=2, tensor=2): restored on one device, and on
  (fsdp=8) and (data=2, tensor=4) meshes, the whole state is bit-identical."""
  root = eight_devices['root']
  out = tmp_path / 'restore.json'
  for mesh, preset in (('1,8,1', 'fsdp'), ('2,1,4', 'fsdp_tensor')):
    _check(_run(['tests.sharded_runs', f'--data_dir={eight_devices["data"]}',
                 f'--root={root}', f'--out={out}', f'--mesh={mesh}',
                 f'--preset={preset}', f'--models={",".join(MODELS)}',
                 '--restore_only'], devices=8))
  for name in MODELS:
    saved = _load(os.path.join(root, f'{name}_2x2x2_fsdp_tensor.npz'))
    config = sharding_configs.get_config(name, eight_devices['data'])
    config.mesh.data = 1
    one_device = {
        axes.path_text(p): np.asarray(x) for p, x in
        jax.tree_util.tree_leaves_with_path(jax.device_get(
            train.load_state(config, os.path.join(root, name))[1]))}
    for tag in ('1x8x1_fsdp', '2x1x4_fsdp_tensor'):
      other = _load(os.path.join(root, f'{name}_{tag}.npz'))
      assert other.keys() == saved.keys()
      for key in saved:
        np.testing.assert_array_equal(other[key], saved[key], err_msg=key)
    assert one_device.keys() == saved.keys()
    for key in saved:
      np.testing.assert_array_equal(one_device[key], saved[key], err_msg=key)
    assert int(saved['step']) == 10


@pytest.mark.parametrize('name', MODELS)
def test_fsdp_divides_state_memory(name, eight_devices):
  """FSDP over 8 devices: parameters + optimizer state per device <= 1/6
  of a replicated copy."""
  layouts = eight_devices['models'][name]['bytes']
  assert layouts['fsdp'] <= layouts['data_parallel'] / 6, layouts


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(fake_data_dir, tmp_path):
  """Two OS processes of 2 devices each (gloo) on a (data=4) mesh train the
  Transformer like one process with 4 devices."""
  # The same tiny ViT as sharding_configs.get_config('vit'), through the CLI.
  common = ['experiments.train', '--config=configs/vit_fashion_mnist.py:smoke',
            f'--config.data.tfds_data_dir={fake_data_dir}',
            '--config.mesh.data=4', '--config.batch_size=16',
            '--config.eval_batch_size=200', '--config.num_train_steps=10',
            '--config.log_every_steps=1', '--config.eval_every_steps=10',
            '--config.write_plots=False', '--config.model.d_model=32',
            '--config.model.num_layers=2', '--config.model.mlp_dim=64']
  port = _free_port()
  two = [_run(common + [f'--workdir={tmp_path / "two"}',
                        f'--coordinator_address=127.0.0.1:{port}',
                        '--num_processes=2', f'--process_id={i}'], devices=2)
         for i in range(2)]
  one = _run(common + [f'--workdir={tmp_path / "one"}'], devices=4)
  for proc in (*two, one):
    _check(proc)

  def losses(workdir):
    return [r['train/loss'] for r in metric_writers.read_history(str(workdir))
            if 'train/loss' in r]
  _assert_close(losses(tmp_path / 'two'), losses(tmp_path / 'one'))
  with open(tmp_path / 'two' / 'sharding.txt') as f:
    assert 'in 2 process(es)' in f.read()


def test_grouped_optimizer_state_follows_its_parameters():
  """multi_transform (frozen / scaled groups) nests states; specs still match."""
  from configs import base
  from bigjax import optimizers
  opt = base.get_config().optimizer
  opt.frozen, opt.lr_multipliers = ('embed/.*',), (('dense/bias', 0.5),)
  tx = optimizers.make_optimizer(opt, optimizers.make_schedule(opt, 10))
  params = {'dense': {'kernel': jnp.zeros((8, 4)), 'bias': jnp.zeros((4,))},
            'embed': {'embedding': jnp.zeros((16, 8))}}
  specs = {'dense': {'kernel': P('fsdp', 'tensor'), 'bias': P('tensor')},
           'embed': {'embedding': P('tensor', 'fsdp')}}
  opt_state = jax.eval_shape(tx.init, params)
  got = sharding.specs_like_params(opt_state, params, specs)
  by_shape = {}
  for leaf, spec in zip(jax.tree.leaves(opt_state), jax.tree.leaves(
      got, is_leaf=lambda x: isinstance(x, P))):
    by_shape.setdefault(leaf.shape, set()).add(spec)
  assert by_shape[(8, 4)] == {P('fsdp', 'tensor')}
  assert by_shape[(4,)] == {P('tensor')}
  assert (16, 8) not in by_shape  # Frozen: no optimizer state at all.
