"""GELU with a written-out backward pass: `jax.nn.gelu`'s values (tanh
approximation, flax's `nn.gelu` default), one pass forward, one backward.

  gelu(x) = x * 0.5 * (1 + tanh(u)),  u = sqrt(2 / pi) * (x + 0.044715 x^3)
  gelu'(x) = 0.5 * (1 + tanh(u)) + 0.5 * x * (1 - tanh(u)^2) * du/dx

Why: autodiff's backward reads tanh(u) from the forward pass, so XLA:CPU's
forward wrote tanh(u) out as a second [batch, length, mlp] array and read it
back for the output (7-8 ms a layer in the benchmark GPT, 32 MB each). This
keeps only x, which the backward reads once with dy, recomputing tanh(u) (by
way of exp, or XLA merges it with the forward's again), as PyTorch's
`gelu_backward` does: GELU forward and backward 114 -> 99 ms a step. The
derivative is formed in float32 whatever x's dtype.
"""

import math

import jax
import jax.numpy as jnp

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_CUBIC = 0.044715


@jax.custom_vjp
def gelu(x):
  """x [...] -> [...]: `jax.nn.gelu(x, approximate=True)` itself."""
  return jax.nn.gelu(x, approximate=True)


def _forward(x):
  return gelu(x), x


def _backward(x, dy):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  # tanh(u) through exp: the forward's own tanh would do, but XLA then
  # merges the two (CSE) and the forward writes tanh(u) out for this pass.
  t = 1.0 - 2.0 / (jnp.exp(2.0 * _SQRT_2_OVER_PI * (xf + _CUBIC * xf ** 3))
                   + 1.0)
  slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * (
      _SQRT_2_OVER_PI * (1.0 + 3.0 * _CUBIC * xf * xf))
  return ((dy.astype(xf.dtype) * slope).astype(dy.dtype),)


gelu.defvjp(_forward, _backward)
