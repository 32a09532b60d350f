"""Recurrent cells, the scan over time, stacks and the row-by-row classifier.

References are independent of our code: flax's own cells stepped in a Python
loop, and NumPy for the Elman formula. Parameters are random numbers of the
shapes `jax.eval_shape(module.init)` gives (nothing compiled for them, and
zero-initialised biases get exercised); applies are jitted, since compiling
is most of these tests' time.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bigjax.models import param_counts
from bigjax.models import recurrent
from tests.train_utils import adam_losses

B, T, D, H = 3, 7, 5, 6  # T=7 is not a multiple of unroll=4.


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(
      scale * np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _random_params(module, *args, seed=0, **kwargs):
  """Random N(0, 0.5^2) params with the structure `module.init` gives."""
  shapes = nn.unbox(jax.eval_shape(
      functools.partial(module.init, **kwargs), jax.random.key(0), *args))
  leaves, tree = jax.tree.flatten(shapes['params'])
  return jax.tree.unflatten(
      tree, [_normal(seed + i, x.shape, 0.5) for i, x in enumerate(leaves)])


def _apply(module, params, *args, **kwargs):
  """`module.apply` under jit; keyword arguments are static unless arrays."""
  arrays = {k: v for k, v in kwargs.items() if isinstance(v, jax.Array)}
  static = {k: v for k, v in kwargs.items() if k not in arrays}
  fn = jax.jit(functools.partial(module.apply, **static))
  return fn({'params': params}, *args, **arrays)


def _loop(cell, params, xs):
  """Steps `cell` over xs [batch, time, input] in Python: (carry, ys)."""
  step = jax.jit(lambda carry, x: cell.apply({'params': params}, carry, x))
  carry = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
  ys = []
  for t in range(xs.shape[1]):
    carry, y = step(carry, xs[:, t])
    ys.append(y)
  return carry, jnp.stack(ys, 1)


def _assert_trees_close(a, b, atol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, atol=atol, rtol=0)


def lstm_params_from_flax(p):
  """flax OptimizedLSTMCell params -> our LSTMCell's (see its docstring)."""
  gates = 'ifgo'
  kernel = jnp.concatenate([
      jnp.concatenate([p[f'h{g}']['kernel'] for g in gates], 1),
      jnp.concatenate([p[f'i{g}']['kernel'] for g in gates], 1)], 0)
  return {'kernel': kernel,
          'bias': jnp.concatenate([p[f'h{g}']['bias'] for g in gates])}


def gru_params_from_flax(p):
  """flax GRUCell params -> our GRUCell's (see its docstring)."""
  cat = lambda names, key: jnp.concatenate([p[n][key] for n in names], -1)
  return {'input_kernel': cat(('ir', 'iz', 'in'), 'kernel'),
          'input_bias': cat(('ir', 'iz', 'in'), 'bias'),
          'recurrent_kernel': cat(('hr', 'hz', 'hn'), 'kernel'),
          'recurrent_bias': p['hn']['bias']}


@pytest.mark.parametrize('flax_cell, ours, convert', [
    (nn.OptimizedLSTMCell(H), recurrent.LSTMCell(H), lstm_params_from_flax),
    (nn.GRUCell(H), recurrent.GRUCell(H), gru_params_from_flax)])
def test_cells_match_flax_with_the_same_weights(flax_cell, ours, convert):
  xs = _normal(0, (B, T, D))
  carry = flax_cell.initialize_carry(jax.random.key(0), (B, D))
  flax_params = _random_params(flax_cell, carry, xs[:, 0])
  carry_ref, ys_ref = _loop(flax_cell, flax_params, xs)

  carry, ys = _apply(recurrent.Recurrence(ours),
                     {'cell': convert(flax_params)}, xs)
  assert ys.shape == (B, T, H)
  _assert_trees_close((carry, ys), (carry_ref, ys_ref), atol=1e-5)
  assert float(jnp.abs(ys).max()) > 0.5  # Not a trivially small state.


@pytest.mark.parametrize('activation, np_activation', [
    (jnp.tanh, np.tanh), (nn.relu, lambda a: np.maximum(a, 0))])
def test_elman_matches_numpy(activation, np_activation):
  xs = _normal(0, (B, T, D))
  module = recurrent.Recurrence(recurrent.ElmanCell(H, activation=activation))
  params = _random_params(module, xs)
  h, ys = _apply(module, params, xs)

  w = np.asarray(params['cell']['kernel'], np.float64)
  b = np.asarray(params['cell']['bias'], np.float64)
  assert w.shape == (H + D, H)  # Rows act on [h, x].
  h_ref, ys_ref = np.zeros((B, H)), []
  for t in range(T):
    h_ref = np_activation(np.concatenate([h_ref, xs[:, t]], -1) @ w + b)
    ys_ref.append(h_ref)
  np.testing.assert_allclose(ys, np.stack(ys_ref, 1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(h, h_ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize('cell, reverse', [
    (recurrent.LSTMCell(H), False), (recurrent.GRUCell(H), True),
    (recurrent.ElmanCell(H), True),
    (nn.OptimizedLSTMCell(H), True)])  # Any cell of flax's protocol runs.
def test_scan_equals_python_loop_over_the_cell(cell, reverse):
  xs = _normal(0, (B, T, D))
  module = recurrent.Recurrence(cell, reverse=reverse)
  params = _random_params(module, xs)
  carry, ys = _apply(module, params, xs)
  order = slice(None, None, -1) if reverse else slice(None)
  carry_ref, ys_ref = _loop(cell, params['cell'], xs[:, order])
  _assert_trees_close((carry, ys), (carry_ref, ys_ref[:, order]), atol=1e-6)


def test_lstm_initialisation():
  xs = _normal(0, (B, T, D))
  params = nn.unbox(jax.jit(recurrent.Recurrence(recurrent.LSTMCell(H)).init)(
      jax.random.key(0), xs))['params']['cell']
  np.testing.assert_array_equal(
      params['bias'], np.repeat([0.0, 1.0, 0.0, 0.0], H))  # Gates i, f, g, o.
  # Each gate's recurrent block starts orthogonal, as flax's do.
  for g in range(4):
    block = params['kernel'][:H, g * H:(g + 1) * H]
    np.testing.assert_allclose(block.T @ block, np.eye(H), atol=1e-5)
  # Input rows are LeCun-normal: variance 1 / fan_in = 1 / D.
  assert np.std(params['kernel'][H:]) == pytest.approx(D ** -0.5, rel=0.25)


@pytest.mark.parametrize('cell, reverse', [
    (recurrent.LSTMCell(H), False), (recurrent.GRUCell(H), True)])
def test_variable_lengths_ignore_padding(cell, reverse):
  lengths = jnp.array([7, 4, 1])
  xs = _normal(0, (B, T, D))
  valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
  other = jnp.where(valid, xs, _normal(1, (B, T, D), scale=10.0))
  module = recurrent.Recurrence(cell, reverse=reverse)
  params = _random_params(module, xs)
  run = jax.jit(lambda xs: module.apply({'params': params}, xs,
                                        lengths=lengths))
  carry, ys = run(xs)

  # Padded content cannot leak in; outputs there are zeros.
  _assert_trees_close((carry, ys), run(other), atol=0)
  np.testing.assert_array_equal(ys * (1 - valid), 0.0)
  for b, n in enumerate(lengths.tolist()):
    carry_b, ys_b = _apply(module, params, xs[b:b + 1, :n])
    np.testing.assert_allclose(ys[b:b + 1, :n], ys_b, atol=1e-6, rtol=0)
    _assert_trees_close(jax.tree.map(lambda c: c[b:b + 1], carry), carry_b,
                        atol=1e-6)


def test_bidirectional_backward_starts_at_last_valid_token():
  lengths = jnp.array([7, 4, 2])
  xs = _normal(0, (B, T, D))
  layer = recurrent.RecurrentLayer('lstm', H, bidirectional=True)
  params = _random_params(layer, xs)
  ys, last = _apply(layer, params, xs, lengths=lengths)
  assert ys.shape == (B, T, 2 * H) and last.shape == (B, 2 * H)

  # The backward cell run forward over each sequence's reversed valid part.
  forward = recurrent.Recurrence(recurrent.LSTMCell(H))
  for b, n in enumerate(lengths.tolist()):
    _, ys_rev = _apply(forward, params['backward'], xs[b:b + 1, :n][:, ::-1])
    np.testing.assert_allclose(ys[b:b + 1, :n, H:], ys_rev[:, ::-1],
                               atol=1e-6, rtol=0)
    np.testing.assert_allclose(last[b, H:], ys_rev[0, -1], atol=1e-6, rtol=0)
    # The forward half's last output is the one at the last valid token.
    np.testing.assert_array_equal(last[b, :H], ys[b, n - 1, :H])
    np.testing.assert_array_equal(ys[b, n:], 0.0)


def _lstm_params(inputs, hidden):
  """Closed form: kernel (hidden + inputs) x 4 hidden, bias 4 hidden."""
  return 4 * hidden * (hidden + inputs) + 4 * hidden


@pytest.mark.parametrize('bidirectional', [False, True])
def test_cross_layer_sharing_counts(bidirectional):
  layers, dirs = 3, 2 if bidirectional else 1
  xs = _normal(0, (B, T, D))

  def counts(sharing):
    stack = recurrent.RecurrentStack('lstm', H, layers, bidirectional, sharing)
    # Shapes alone, as the train loop counts them.
    variables = jax.eval_shape(
        lambda: stack.init(jax.random.key(0), xs, train=False))
    return param_counts.count_parameters(variables)

  # Unshared: the first layer reads D features, the others dirs * H.
  first, other = dirs * _lstm_params(D, H), dirs * _lstm_params(dirs * H, H)
  unshared = first + (layers - 1) * other
  assert counts('none') == {
      'unique': unshared, 'effective': unshared,
      'unique/layer0': first, 'effective/layer0': first,
      'unique/layer1': other, 'effective/layer1': other,
      'unique/layer2': other, 'effective/layer2': other}

  # Shared: one cell per direction, stored once and applied `layers` times,
  # i.e. 1/layers of what the stacked layers apply.
  projection = D * dirs * H + dirs * H
  assert counts('all') == {
      'unique': projection + other, 'effective': projection + layers * other,
      'unique/input_projection': projection,
      'effective/input_projection': projection,
      'unique/shared': other, 'effective/shared': layers * other}


def test_shared_layers_apply_one_cell_each_layer():
  """With sharing, every layer is the same cell applied to the one below."""
  xs = _normal(0, (B, T, D))
  stack = recurrent.RecurrentStack('gru', H, 3, cross_layer_sharing='all')
  params = _random_params(stack, xs, train=False)
  ys, last = _apply(stack, params, xs, train=False)

  projection = params['input_projection']
  h = xs @ projection['kernel'] + projection['bias']
  layer = recurrent.RecurrentLayer('gru', H)
  for _ in range(3):
    h, last_ref = _apply(layer, params['shared']['layer'], h)
  np.testing.assert_allclose(ys, h, atol=1e-6, rtol=0)
  np.testing.assert_allclose(last, last_ref, atol=1e-6, rtol=0)


def test_unroll_does_not_change_outputs():
  xs = _normal(0, (B, T, D))
  lengths = jnp.array([7, 5, 3])
  make = lambda unroll: recurrent.RecurrentLayer('lstm', H, bidirectional=True,
                                                 unroll=unroll)
  params = _random_params(make(1), xs)
  ys1, last1 = _apply(make(1), params, xs, lengths=lengths)
  ys4, last4 = _apply(make(4), params, xs, lengths=lengths)
  np.testing.assert_allclose(ys4, ys1, atol=1e-6, rtol=0)
  np.testing.assert_allclose(last4, last1, atol=1e-6, rtol=0)


@pytest.mark.parametrize('reverse', [False, True])
@pytest.mark.parametrize('padded', [False, True])
def test_fused_lstm_equals_autodiff_of_the_cell(reverse, padded):
  """`Recurrence` runs an LSTMCell through fused_lstm's written-out backward:
  outputs, final carry and every gradient (kernel, bias, inputs, starting
  carry) equal autodiff of the cell stepped by `lax.scan`."""
  cell = recurrent.LSTMCell(H)
  xs = _normal(0, (B, T, D))
  params = _random_params(recurrent.Recurrence(cell), xs)['cell']
  start = (_normal(1, (B, H)), _normal(2, (B, H)))
  lengths = jnp.array([7, 4, 0]) if padded else None
  weights = _normal(3, (B, T, H))

  def loss(run, params, xs, start):
    (c, h), ys = run(params, xs, start)
    return jnp.sum(jnp.sin(ys) * weights) + jnp.sum(c * h) + jnp.sum(c ** 2)

  def ours(params, xs, start):
    module = recurrent.Recurrence(cell, reverse=reverse)
    return module.apply({'params': {'cell': params}}, xs, lengths=lengths,
                        initial_carry=start)

  def reference(params, xs, start):
    valid = (jnp.ones((B, T), bool) if lengths is None
             else jnp.arange(T)[None, :] < lengths[:, None])

    def step(carry, inputs):
      x, v = inputs
      new, y = cell.apply({'params': params}, carry, x)
      new = jax.tree.map(lambda a, b: jnp.where(v[:, None], a, b), new, carry)
      return new, jnp.where(v[:, None], y, 0)
    carry, ys = jax.lax.scan(step, start, (xs.swapaxes(0, 1), valid.T),
                             reverse=reverse)
    return carry, ys.swapaxes(0, 1)

  assert 'lstm_over_time' in str(jax.make_jaxpr(ours)(params, xs, start))
  _assert_trees_close(jax.jit(ours)(params, xs, start),
                      jax.jit(reference)(params, xs, start), atol=1e-6)
  grad = lambda run: jax.jit(jax.grad(functools.partial(loss, run),
                                      argnums=(0, 1, 2)))
  got, want = grad(ours)(params, xs, start), grad(reference)(params, xs, start)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5,
                                                       rtol=1e-5), got, want)


@pytest.mark.parametrize('make_cell', [recurrent.LSTMCell, recurrent.GRUCell])
def test_gradients_match_finite_differences(make_cell):
  with jax.enable_x64(True):
    xs = jax.random.normal(jax.random.key(0), (2, 4, 3), jnp.float64)
    lengths = jnp.array([4, 2])
    module = recurrent.Recurrence(make_cell(4, param_dtype=jnp.float64),
                                  reverse=True)
    params = nn.unbox(jax.jit(module.init)(jax.random.key(1), xs))['params']
    weights = jax.random.normal(jax.random.key(2), (2, 4, 4), jnp.float64)

    @jax.jit
    def loss(params, xs):
      carry, ys = module.apply({'params': params}, xs, lengths=lengths)
      return jnp.sum(ys * weights) + sum(jnp.sum(c ** 2)
                                         for c in jax.tree.leaves(carry))
    check_grads(loss, (params, xs), order=1, modes=['rev'])


@pytest.mark.parametrize('kwargs, width', [
    ({}, 8),
    ({'cell': 'gru', 'num_layers': 2, 'bidirectional': True, 'pooling': 'mean',
      'dropout_rate': 0.2}, 16),
    ({'cell': 'elman', 'num_layers': 2, 'cross_layer_sharing': 'all'}, 8)])
def test_classifier_shapes(kwargs, width):
  model = recurrent.RNNClassifier(hidden_size=8, **kwargs)
  images = jnp.zeros((4, 28, 28, 1))
  variables = nn.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), images, train=False)))
  logits = jax.eval_shape(
      lambda params: model.apply({'params': params}, images, train=True,
                                 rngs={'dropout': jax.random.key(1)}),
      variables['params'])
  assert logits.shape == (4, 10)
  assert variables['params']['head']['kernel'].shape == (width, 10)


def test_classifier_reads_rows_as_steps():
  """[B, H, W, C] images are H steps of W * C features; 'last' is read."""
  model = recurrent.RNNClassifier(hidden_size=8)
  images = _normal(0, (2, 28, 14, 2))
  params = _random_params(model, images, train=False)
  logits = _apply(model, params, images, train=False)

  stack = recurrent.RecurrentStack('lstm', 8)
  _, last = _apply(stack, params['rnn'], images.reshape(2, 28, 28),
                   train=False)
  head = params['head']
  np.testing.assert_allclose(logits, last @ head['kernel'] + head['bias'],
                             atol=1e-5, rtol=0)


def test_classifier_trains_on_random_data():
  model = recurrent.RNNClassifier(hidden_size=16, dropout_rate=0.1)
  images = _normal(0, (16, 28, 28, 1))
  labels = jnp.arange(16) % 10
  params = nn.unbox(jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), images))['params']
  losses = adam_losses(model, params, images, labels, steps=20)
  assert losses[0] == pytest.approx(np.log(10), abs=0.3)
  assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize('field, value', [
    ('cell', 'lstn'), ('cross_layer_sharing', 'attention'), ('pooling', 'max')])
def test_unknown_choices_are_named(field, value):
  model = recurrent.RNNClassifier(hidden_size=4, **{field: value})
  with pytest.raises(ValueError, match=f'{field}={value!r} is not one of'):
    jax.eval_shape(lambda: model.init(jax.random.key(0),
                                      jnp.zeros((1, 28, 28, 1)), train=False))
