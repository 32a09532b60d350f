"""Convolutional models against NumPy and closed-form references."""

import os

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.test_util import check_grads

from bigjax import flops
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


@pytest.mark.parametrize('shape', [(2, 6, 8, 3), (2, 7, 5, 3)])
def test_max_pool_2x2_equals_flax_max_pool_with_gradient(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  # Ties: a constant region (an image's background) and a window whose
  # maximum appears twice, not first.
  x = x.at[0, :4, :4].set(0.5).at[1, 0, 1].set(9.0).at[1, 1, 0].set(9.0)
  np.testing.assert_array_equal(cnn.max_pool_2x2(x),
                                nn.max_pool(x, (2, 2), strides=(2, 2)))
  g = jax.random.normal(jax.random.PRNGKey(1), cnn.max_pool_2x2(x).shape)
  g_ours = jax.vjp(cnn.max_pool_2x2, x)[1](g)[0]
  g_flax = jax.vjp(lambda y: nn.max_pool(y, (2, 2), (2, 2)), x)[1](g)[0]
  np.testing.assert_array_equal(g_ours, g_flax)
  # Each window's gradient goes to exactly one element, the first maximum.
  assert g_ours[0, 0, 0, 0] == g[0, 0, 0, 0] and g_ours[0, 1, 1, 0] == 0
  assert g_ours[1, 0, 1, 0] == g[1, 0, 0, 0] and g_ours[1, 1, 0, 0] == 0
  # Under vmap (seeds), the same.
  gv = jax.vmap(lambda a, b: jax.vjp(cnn.max_pool_2x2, a)[1](b)[0])(
      x[:, None], g[:, None])
  np.testing.assert_array_equal(gv[:, 0], g_ours)


@pytest.mark.parametrize('shape', [(2, 6, 8, 3), (2, 7, 5, 3)])
def test_avg_pool_2x2_equals_flax_avg_pool_with_gradient(shape):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  np.testing.assert_allclose(cnn.avg_pool_2x2(x),
                             nn.avg_pool(x, (2, 2), strides=(2, 2)),
                             rtol=1e-6)
  g = jax.random.normal(jax.random.PRNGKey(1), cnn.avg_pool_2x2(x).shape)
  np.testing.assert_allclose(
      jax.vjp(cnn.avg_pool_2x2, x)[1](g)[0],
      jax.vjp(lambda y: nn.avg_pool(y, (2, 2), (2, 2)), x)[1](g)[0],
      rtol=1e-6)


@pytest.mark.parametrize('x_shape,kernel_shape,strides,padding,by_taps', [
    ((2, 9, 7, 1), (3, 3, 1, 4), (1, 1), 'SAME', True),  # the first layer
    ((2, 9, 7, 3), (3, 3, 3, 4), (2, 1), 'VALID', True),  # RGB, strided
    ((2, 9, 7, 1), (5, 5, 1, 4), (2, 2), 'SAME', True),
    ((2, 9, 7, 3), (3, 3, 3, 4), (1, 1), ((2, 0), (1, -1)), True),
    ((2, 11, 3), (3, 3, 4), (1,), 'SAME', True),  # one spatial dimension
    ((2, 9, 7, 8), (3, 3, 8, 4), (1, 1), 'SAME', False),  # 72 products
])
def test_seedwise_conv_equals_xla_conv(x_shape, kernel_shape, strides,
                                       padding, by_taps):
  """Values, gradients, FLOP count and vmap over kernels (seeds) equal
  `lax.conv_general_dilated`'s, whichever forward runs."""
  x = jax.random.normal(jax.random.PRNGKey(0), x_shape)
  kernels = jax.random.normal(jax.random.PRNGKey(1), (3, *kernel_shape))
  specs = ('NHWC', 'HWIO', 'NHWC') if len(x_shape) == 4 else ('NWC', 'WIO',
                                                                'NWC')
  numbers = lax.conv_dimension_numbers(x_shape, kernel_shape, specs)

  def loss(conv_fn):
    def fn(kernel, x):
      y = conv_fn(x, kernel, strides, padding, dimension_numbers=numbers)
      return jnp.sum(jnp.sin(y))
    return fn

  ours, xla = loss(cnn.seedwise_conv_general_dilated), loss(
      lax.conv_general_dilated)
  assert ('conv_by_taps' in str(jax.make_jaxpr(ours)(kernels[0], x))) == by_taps
  assert flops.jaxpr_flops(ours, kernels[0], x) == flops.jaxpr_flops(
      xla, kernels[0], x) > 0
  for kernel in kernels[:1]:
    np.testing.assert_allclose(ours(kernel, x), xla(kernel, x), rtol=1e-5)
  grads = jax.vmap(jax.grad(ours, argnums=(0, 1)), in_axes=(0, None))
  want = jax.vmap(jax.grad(xla, argnums=(0, 1)), in_axes=(0, None))
  for got, expected in zip(grads(kernels, x), want(kernels, x)):
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


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
