"""Convolutional models against NumPy and closed-form references."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.test_util import check_grads

from bigjax import train
from bigjax.models import cnn
from bigjax.models import param_counts
from tests.test_train import smoke_config


def np_conv_same(x, kernel, bias):
  """'SAME' 2-D convolution (cross-correlation) in NumPy, stride 1.

  x [B, H, W, C], kernel [kh, kw, C, F] -> [B, H, W, F].
  """
  kh, kw = kernel.shape[:2]
  pad = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = np.zeros(x.shape[:3] + (kernel.shape[-1],))
  for i in range(kh):
    for j in range(kw):
      window = pad[:, i:i + x.shape[1], j:j + x.shape[2], :]
      out += np.einsum('bhwc,cf->bhwf', window, kernel[i, j])
  return out + bias


def np_cnn(params, x):
  """The seeds' CNN, written out in NumPy."""
  for name in ('conv0', 'conv1'):
    x = np.maximum(np_conv_same(x, params[name]['kernel'], params[name]['bias']), 0)
    b, h, w, c = x.shape
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  x = x.reshape(x.shape[0], -1)
  x = np.maximum(x @ params['hidden']['kernel'] + params['hidden']['bias'], 0)
  return x @ params['head']['kernel'] + params['head']['bias']


def test_seed_cnn_matches_numpy_and_closed_form_count():
  model = cnn.CNN()
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 28, 28, 1))
  variables = nn.unbox(model.init(jax.random.PRNGKey(1), x, train=False))
  got = model.apply(variables, x, train=False)
  params = jax.tree.map(lambda a: np.asarray(a, np.float64), variables['params'])
  want = np_cnn(params, np.asarray(x, np.float64))
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
  # conv 3x3x1x32 + 32, conv 3x3x32x64 + 64, dense 7*7*64 -> 128, dense 128 -> 10.
  closed_form = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (49 * 64 * 128 + 128) + (128 * 10 + 10)
  counts = param_counts.count_parameters(variables)
  assert counts['unique'] == counts['effective'] == closed_form == 421_642


def test_max_pool_2x2_equals_flax_max_pool_with_gradient():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 6, 8, 3))
  np.testing.assert_array_equal(cnn.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  g_ours = jax.grad(lambda y: jnp.sum(cnn.max_pool_2x2(y) ** 2))(x)
  g_flax = jax.grad(lambda y: jnp.sum(nn.max_pool(y, (2, 2), (2, 2)) ** 2))(x)
  np.testing.assert_allclose(g_ours, g_flax, atol=1e-6)


def test_cnn_gradients_are_correct():
  model = cnn.CNN(features=(2, 3), dense_features=4, num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1), jnp.float32)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x, train=False))['params']
  with jax.enable_x64(True):
    params64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    x64 = jnp.asarray(x, jnp.float64)
    check_grads(lambda p: model.apply({'params': p}, x64, train=False).sum(),
                (params64,), order=1, modes=('rev',))


def test_batch_norm_statistics_update_in_training_only():
  block = cnn.ResidualBlock(features=3, batch_norm=True)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3)) * 3 + 1
  variables = nn.unbox(block.init(jax.random.PRNGKey(1), x, train=False))
  y, updated = block.apply(variables, x, train=True, mutable=['batch_stats'])
  assert y.shape == x.shape
  np.testing.assert_array_equal(variables['batch_stats']['norm0']['mean'], 0.0)
  # momentum 0.9 from zeros: the running mean moves to 0.1 * batch mean.
  np.testing.assert_allclose(updated['batch_stats']['norm0']['mean'],
                             0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-4)
  _, unchanged = block.apply(variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, unchanged['batch_stats'],
               variables['batch_stats'])


def test_resnet_carries_batch_stats_through_the_loop(fake_data_dir, tmp_path):
  config = smoke_config(fake_data_dir, write_plots=False, num_train_steps=20,
                        eval_every_steps=20)
  config.model = type(config.model)({
      'name': 'resnet', 'num_classes': 10, 'stage_features': (4, 8),
      'blocks_per_stage': 1, 'batch_norm': True, 'dropout_rate': 0.0})
  workdir = str(tmp_path / 'resnet')
  final = train.train_and_evaluate(config, workdir)
  assert np.isfinite(final['eval/loss'])
  with ocp.CheckpointManager(os.path.join(workdir, 'checkpoints')) as m:
    state = m.restore(20)['state']
  # 20 training steps moved every channel's running variance away from its
  # init (exactly one if the statistics were dropped). By how much depends
  # on rounding: one channel ended 1e-3 from it after a change of XLA flags.
  var = np.asarray(state['model_state']['batch_stats']['final_norm']['var'])
  assert np.all(np.abs(var - 1.0) > 1e-5), var
  assert np.abs(var - 1.0).max() > 0.1, var
