"""bigjax's LayerNorm and GELU against flax's and JAX's: parameters, values,
gradients, dtypes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from bigjax.models import activations
from bigjax.models import axes
from bigjax.models import layer_norm

SHAPE = (3, 5, 16)


def _flax_layer_norm():
  """What bigjax used before: nn.LayerNorm with logical axis names."""
  return nn.LayerNorm(
      scale_init=axes.logical(nn.initializers.ones_init(), ('embed',)),
      bias_init=axes.logical(nn.initializers.zeros_init(), ('embed',)))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=SHAPE) * 3.0 + 1.5
  x[0, 1] = 2.0          # A constant row: variance 0.
  x[1, 2, :8] = 1e4      # A row whose variance dwarfs its neighbours'.
  params = {'scale': jnp.asarray(rng.normal(size=SHAPE[-1:]), jnp.float32),
            'bias': jnp.asarray(rng.normal(size=SHAPE[-1:]), jnp.float32)}
  weights = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
  return jnp.asarray(x, jnp.float32), params, weights


def test_parameters_are_flax_layer_norms():
  """Same names, shapes, dtypes, initial values and logical axes, so that
  checkpoints and sharding rules carry over."""
  x = jnp.ones(SHAPE)
  ours = layer_norm.LayerNorm().init(jax.random.key(0), x)
  theirs = _flax_layer_norm().init(jax.random.key(0), x)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), meta.unbox(ours))
          == jax.tree.map(lambda a: (a.shape, a.dtype), meta.unbox(theirs)))
  jax.tree.map(np.testing.assert_array_equal, meta.unbox(ours),
               meta.unbox(theirs))
  names = lambda tree: jax.tree.map(
      lambda box: box.names, tree,
      is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  assert names(ours) == names(theirs) == {
      'params': {'scale': ('embed',), 'bias': ('embed',)}}


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_flax(dtype):
  """Output (dtype included) and the gradients of x, scale and bias, with a
  constant row and a row of huge variance, in float32 and in bfloat16 (as the
  mixed-precision policy runs it: inputs and parameters cast)."""
  x, params, weights = _inputs()
  x = x.astype(dtype)
  params = jax.tree.map(lambda a: a.astype(dtype), params)

  def loss(module, params, x):
    y = module.apply({'params': params}, x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32)) * weights), y

  def run(module):
    return jax.jit(jax.value_and_grad(
        lambda p, x: loss(module, p, x), argnums=(0, 1), has_aux=True))(
            params, x)

  (_, got), got_grads = run(layer_norm.LayerNorm())
  (_, want), want_grads = run(_flax_layer_norm())
  assert got.dtype == want.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float32),
                             np.asarray(want, np.float32), atol=tol, rtol=tol)
  for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    assert g.dtype == w.dtype
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, w, atol=tol * np.abs(w).max(), rtol=tol)


def test_vmapped_over_seeds():
  """Under vmap (seeds in one program) each member equals its own run."""
  xs = jnp.stack([_inputs(seed)[0] for seed in range(3)])
  params = jax.tree.map(lambda *a: jnp.stack(a),
                        *[_inputs(seed)[1] for seed in range(3)])
  module = layer_norm.LayerNorm()

  def grads(params, x):
    return jax.grad(lambda p, x: jnp.sum(
        module.apply({'params': p}, x) ** 3), argnums=(0, 1))(params, x)

  together = jax.jit(jax.vmap(grads))(params, xs)
  for i in range(3):
    alone = jax.jit(grads)(jax.tree.map(lambda a: a[i], params), xs[i])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a[i], b, rtol=1e-6, atol=1e-6), together, alone)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_gelu_equals_jax_gelu(dtype):
  """activations.gelu: jax.nn.gelu's values exactly, and its gradient (the
  derivative formed in float32, so bfloat16 agrees to bfloat16's rounding)."""
  x = jnp.asarray(np.linspace(-8.0, 8.0, 1001), dtype)
  dy = jnp.asarray(np.cos(np.arange(1001.0)), dtype)
  np.testing.assert_array_equal(np.asarray(activations.gelu(x), np.float32),
                                np.asarray(jax.nn.gelu(x), np.float32))
  grad = lambda f, x, dy: jax.jit(jax.vjp(f, x)[1])(dy)[0]
  got, want = grad(activations.gelu, x, dy), grad(jax.nn.gelu, x, dy)
  assert got.dtype == want.dtype == dtype
  # Against float32 autodiff at the same points: to float32's rounding for
  # float32, to bfloat16's (8 bits) for bfloat16.
  reference = grad(jax.nn.gelu, x.astype(jnp.float32), dy.astype(jnp.float32))
  tol = 1e-5 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(np.asarray(got, np.float32), reference,
                             atol=tol, rtol=tol)
