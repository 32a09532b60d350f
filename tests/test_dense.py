"""bigjax.models.dense: a dense layer's product and gradients, rewritten."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from bigjax.models import dense


def _layers(dot_general):
  """A Dense over the last axis and a DenseGeneral in and out of heads."""
  class Layers(nn.Module):

    @nn.compact
    def __call__(self, x):
      h = nn.DenseGeneral((3, 4), dot_general=dot_general)(x)  # 6 -> 3x4
      h = jnp.tanh(h)
      h = nn.DenseGeneral(5, axis=(-2, -1), dot_general=dot_general)(h)
      return nn.Dense(9, dot_general=dot_general)(jnp.tanh(h))
  return Layers()


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_equal_lax_dot_general(dtype):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6)), dtype)
  plain, ours = _layers(None), _layers(dense.dot_general)
  params = plain.init(jax.random.PRNGKey(0), x)
  params = jax.tree.map(lambda p: p.astype(dtype), params)

  def loss(model, params, x):
    return jnp.sum(jnp.sin(model.apply(params, x).astype(jnp.float32)))

  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(loss(ours, params, x), loss(plain, params, x),
                             rtol=tol)
  want = jax.grad(lambda p, x: loss(plain, p, x), argnums=(0, 1))(params, x)
  got = jax.grad(lambda p, x: loss(ours, p, x), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(w, np.float32), rtol=tol, atol=tol)


def test_weight_gradient_is_one_product_with_no_transpose():
  """The point of the module: dW = x^T dy contracts dimension 0 of both, so
  XLA needs neither a transposed copy of dy nor a transposed result."""
  x = jnp.ones((4, 8, 16))
  w = jnp.ones((16, 32))
  jaxpr = jax.make_jaxpr(jax.grad(
      lambda w: jnp.sum(dense.dot_general(x, w, (((2,), (0,)), ((), ()))))))(
          w)
  dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == 'dot_general']
  weight_grad = [e for e in dots
                 if e.params['dimension_numbers'][0] == ((0,), (0,))]
  assert len(weight_grad) == 1
  assert weight_grad[0].outvars[0].aval.shape == (16, 32)
  # Only weight-sized arrays are transposed (W^T for dx), never x or dy.
  transposed = [e.invars[0].aval.size for e in jaxpr.jaxpr.eqns
                if e.primitive.name == 'transpose']
  assert all(size == w.size for size in transposed)


def test_other_products_are_passed_through():
  """Batch dimensions or contracting dimensions elsewhere: lax.dot_general,
  untouched."""
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3, 4, 5)), rng.normal(size=(3, 5, 6))
  numbers = (((2,), (1,)), ((0,), (0,)))
  np.testing.assert_allclose(dense.dot_general(a, b, numbers),
                             lax.dot_general(a, b, numbers), rtol=1e-6)
  c = rng.normal(size=(6, 5))
  numbers = (((1,), (1,)), ((), ()))  # rhs contracts its last axis.
  np.testing.assert_allclose(dense.dot_general(a[0], c, numbers),
                             lax.dot_general(a[0], c, numbers), rtol=1e-6)


def test_matmul_inside_a_scan_equals_the_plain_product():
  """`matmul` as the recurrent cells use it: inside a scan, the weight
  broadcast over steps; values and both gradients as with `@`."""
  rng = np.random.default_rng(2)
  xs = jnp.asarray(rng.normal(size=(5, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)

  def run(matmul, w, xs):
    def step(h, x):
      h = jnp.tanh(matmul(jnp.concatenate([h, x], -1), w))
      return h, h
    return jnp.sum(jnp.sin(lax.scan(step, jnp.zeros((3, 4)), xs)[1]))

  plain = lambda x, w: x @ w
  np.testing.assert_allclose(run(dense.matmul, w, xs), run(plain, w, xs),
                             rtol=1e-6)
  want = jax.grad(lambda w, xs: run(plain, w, xs), argnums=(0, 1))(w, xs)
  got = jax.grad(lambda w, xs: run(dense.matmul, w, xs), argnums=(0, 1))(w, xs)
  for g, e in zip(got, want):
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
