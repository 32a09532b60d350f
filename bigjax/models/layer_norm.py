"""LayerNorm with a written-out backward pass: `flax.linen.LayerNorm`'s
parameters, values and gradients, without its backward's full-size copies.

  y = (x - mean) * rsqrt(var + eps) * scale + bias, over the last axis,

statistics in float32 (at least), var = E[x^2] - E[x]^2 clipped at 0, and the
result in the dtype of x, scale and bias together: all as flax computes them,
so a checkpoint of either loads into the other.

Why: autodiff of that formula sums g = dy * scale and g * xhat over each row.
On the CPU, XLA hands such reductions to YNNPACK, whose fusions take no
broadcast inside them, so XLA writes `scale` and the row statistics out as
full [batch, length, features] arrays (8 MB each in the benchmark GPT) and
the backward's reduction fusion reads six such arrays. The benchmark GPT
spent 162 ms of its 2.2 s step (one core) on its 9 LayerNorms, about 18 ms
each forward and backward, where PyTorch's take 2.5 ms.

Here the custom VJP keeps x and the row statistics, and forms the two row
sums that involve `scale` as products with it (sum_f g_f = dy . scale and
sum_f g_f xhat_f = (dy * xhat) . scale), which need no broadcast of it: the
same LayerNorms took 97 ms, and the step 2.14 s against 2.22 s (alternating
in one process). The forward's mean and E[x^2] are such products too (with
ones): as YNNPACK reductions their fusions wrote the statistics out already
broadcast to [batch, length, features], and later passes read them back
(LayerNorms and their products 126 -> 82 ms a step; the step 1.92 -> 1.90
s). The gradient is the usual one (PyTorch's too):

  dx = rsqrt(var + eps) * (g - mean_f(g) - xhat * mean_f(g * xhat)),
  dscale = sum over rows of dy * xhat,  dbias = sum over rows of dy.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from bigjax.models import axes


def _stat_dtype(x):
  return jnp.promote_types(x.dtype, jnp.float32)


@jax.jit
def weighted_row_sum(a, v):
  """a [..., F] . v [F] -> [...], exactly. A normalisation's row sum, written
  as a product (see the module doc) and named, so that `bigjax.flops` counts
  no model FLOPs for it; like the statistics, it runs in float32."""
  return lax.dot_general(a, v.astype(a.dtype),
                         (((a.ndim - 1,), (0,)), ((), ())),
                         precision=lax.Precision.HIGHEST)


def _weighted_row_mean(a, v):
  """a [..., F], v [F] -> [..., 1]: mean_f(a_f v_f), by `weighted_row_sum`."""
  return weighted_row_sum(a, v)[..., None] / a.shape[-1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, epsilon):
  """x [..., F], scale [F], bias [F] -> [..., F] (see the module doc)."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  xf = x.astype(_stat_dtype(x))
  ones = jnp.ones(x.shape[-1:], xf.dtype)
  mean = _weighted_row_mean(xf, ones)
  var = jnp.maximum(0.0, _weighted_row_mean(xf * xf, ones) - mean * mean)
  rstd = lax.rsqrt(var + epsilon)
  y = (xf - mean) * (rstd * scale) + bias
  return (y.astype(jnp.result_type(x, scale, bias)),
          (x, scale, mean, rstd))


def _backward(epsilon, residuals, dy):
  del epsilon  # In rstd.
  x, scale, mean, rstd = residuals
  stat = mean.dtype
  xhat = (x.astype(stat) - mean) * rstd
  dyf = dy.astype(stat)
  dy_xhat = dyf * xhat
  rows = tuple(range(x.ndim - 1))
  g_mean = _weighted_row_mean(dyf, scale)            # mean_f(g)
  g_xhat_mean = _weighted_row_mean(dy_xhat, scale)   # mean_f(g xhat)
  dx = rstd * (dyf * scale.astype(stat) - g_mean - xhat * g_xhat_mean)
  return (dx.astype(x.dtype), dy_xhat.sum(rows).astype(scale.dtype),
          dyf.sum(rows).astype(scale.dtype))


layer_norm.defvjp(_forward, _backward)


class LayerNorm(nn.Module):
  """`nn.LayerNorm` over the last axis (its defaults), with `layer_norm`'s
  backward. Parameters 'scale' (ones) and 'bias' (zeros), [features], float32,
  logical axis 'embed'.

  Attributes:
    epsilon: added to the variance.
  """
  epsilon: float = 1e-6

  @nn.compact
  def __call__(self, x):
    """x [..., features] -> the same shape."""
    features = (x.shape[-1],)
    scale = self.param(
        'scale', axes.logical(nn.initializers.ones_init(), ('embed',)),
        features, jnp.float32)
    bias = self.param(
        'bias', axes.logical(nn.initializers.zeros_init(), ('embed',)),
        features, jnp.float32)
    return layer_norm(x, scale, bias, self.epsilon)
