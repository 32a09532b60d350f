"""An LSTM layer over a whole sequence, with its backward pass written out.

`lstm_over_time` computes what `recurrent.Recurrence` computes with a
`recurrent.LSTMCell` (the same parameters, carry, masking and outputs, the
same matmul per step), and `Recurrence` uses it for that cell. Autodiff of the
per-step cell is correct but slow on XLA:CPU, where each small operation in a
loop body costs 5-10 us whatever its size:

- the forward pass stacked 12 per-step values for the backward (each gate,
  both states, tanh(c), ...), one dynamic-update-slice each;
- the backward pass accumulated the weight gradient inside the time loop:
  a [hidden + input, batch] x [batch, 4 hidden] matmul and an add per step.

Here the forward pass keeps the activated gates and the carried c and h
(each its own [time, batch, hidden] array), the backward loop runs a few
elementwise passes and one [batch, 4 hidden] x [4 hidden, hidden] matmul per
step, and the gradients of the kernel and bias (together, through a column
of ones) and of the inputs are each one large matmul after the loop, as
cuDNN's LSTM does. The benchmark LSTM's training step (28 steps, batch 128,
hidden 128) went from 23.1 to 19.1 ms (one core, jaxlib 0.10.2, the two
alternating in one process).

Reverse-mode only: `jax.jvp` through it is not defined (no model here needs
forward-mode derivatives).
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp

from bigjax.models import dense


def step(kernel, bias, c, h, x):
  """One LSTM step, the formula of `recurrent.LSTMCell` (which calls it):
  c, h [batch, hidden], x [batch, input] -> ((i, f, g, o), c', h'), the
  activated gates and the new state, each [batch, hidden]."""
  # dense.matmul: XLA:CPU ran the backward's d[h, x] = dgates . kernel^T
  # with the kernel transposed inside the product, 13% of a 28-step LSTM
  # training step more than with kernel^T materialised.
  z = dense.matmul(jnp.concatenate([h, x], -1), kernel) + bias
  i, f, g, o = jnp.split(z, 4, axis=-1)
  i, f, g, o = (jax.nn.sigmoid(i), jax.nn.sigmoid(f), jnp.tanh(g),
                jax.nn.sigmoid(o))
  c = f * c + i * g
  return (i, f, g, o), c, o * jnp.tanh(c)


def _previous(states, initial, reverse: bool):
  """The state each step started from: [time, ...] states after each step,
  `initial` [...] before the first step (the last index when reversed)."""
  if reverse:
    return jnp.concatenate([states[1:], initial[None]], 0)
  return jnp.concatenate([initial[None], states[:-1]], 0)


def _forward(kernel, bias, xs, c0, h0, valid, reverse, unroll, residuals):
  """The forward scan: ((c, h), ys), and with `residuals` also what the
  backward needs: per step the activated gates i, f, g, o and the carried c
  and h, each [time, batch, hidden] (separate arrays: a loop step that
  slices a column block out of a stacked [batch, 4 * hidden] ran its
  elementwise work 2x slower on XLA:CPU)."""

  def scan_step(carry, inputs):
    c, h = carry
    x, v = inputs
    gates, c_new, h_new = step(kernel, bias, c, h, x)
    y = None  # Without padding, the outputs are the carried h.
    if v is not None:  # Padded steps keep the carry and output zeros.
      c_new = jnp.where(v[:, None], c_new, c)
      y = jnp.where(v[:, None], h_new, 0)
      h_new = jnp.where(v[:, None], h_new, h)
    saved = (gates, c_new) if residuals else None
    return (c_new, h_new), (y, h_new, saved)

  (c, h), (ys, hs, saved) = lax.scan(scan_step, (c0, h0), (xs, valid),
                                     reverse=reverse, unroll=unroll)
  out = ((c, h), hs if ys is None else ys)
  return (out, (*saved, hs)) if residuals else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def lstm_over_time(kernel, bias, xs, c0, h0, valid, reverse=False, unroll=1):
  """Runs `recurrent.LSTMCell`'s step over time.

  Args:
    kernel: [hidden + input, 4 * hidden], rows for h first, then x; columns
      the gates i, f, g, o.
    bias: [4 * hidden].
    xs: [time, batch, input] (time-major).
    c0, h0: the starting carry, each [batch, hidden].
    valid: bool [time, batch] or None. At a step where it is False, the
      carry stays as it was and the output is zero.
    reverse: run from the last step to the first.
    unroll: time steps per loop iteration.

  Returns:
    ((c, h), ys): the final carry, each [batch, hidden], and the outputs
    ys [time, batch, hidden].
  """
  return _forward(kernel, bias, xs, c0, h0, valid, reverse, unroll,
                  residuals=False)


def _lstm_fwd(kernel, bias, xs, c0, h0, valid, reverse, unroll):
  out, (acts, cs, hs) = _forward(kernel, bias, xs, c0, h0, valid, reverse,
                                 unroll, residuals=True)
  return out, (kernel, xs, c0, h0, valid, acts, cs, hs)


def _lstm_bwd(reverse, unroll, residuals, cotangents):
  kernel, xs, c0, h0, valid, acts, cs, hs = residuals
  (dc_last, dh_last), dys = cotangents
  hidden = c0.shape[-1]
  c_prev = _previous(cs, c0, reverse)
  # d[h, x] = dz kernel^T, transposed once, outside the loop. Inside it only
  # d(h) is needed (the inputs' share is one matmul after it), so on one
  # device the loop multiplies by the h rows alone (7% of the benchmark
  # LSTM's step). On a mesh it multiplies by the whole kernel and slices
  # the product: XLA's SPMD partitioner (jaxlib 0.10.2) miscompiles a loop
  # body that reads a slice of a kernel split over its rows (gradients 40%
  # off with the kernel over fsdp=2 and tensor=2; tests/test_sharding.py).
  kernel_t = kernel.T
  whole = jax.device_count() > 1
  kernel_h_t = kernel_t if whole else kernel_t[:, :hidden]

  def step(carry, inputs):
    dc, dh = carry
    dy, (i, f, g, o), c_new, c_old, v = inputs
    dh_new = dh + dy
    dc_new = dc
    if v is not None:  # A padded step passed its carry through unchanged.
      keep = v[:, None]
      dh_new = jnp.where(keep, dh_new, 0)
      dc_new = jnp.where(keep, dc, 0)
    tanh_c = jnp.tanh(c_new)
    dc_new = dc_new + dh_new * o * (1 - tanh_c * tanh_c)
    # The pre-activations' gradients, [batch, 4 * hidden] in gate order.
    dz = jnp.concatenate([
        dc_new * g * i * (1 - i),
        dc_new * c_old * f * (1 - f),
        dc_new * i * (1 - g * g),
        dh_new * tanh_c * o * (1 - o)], -1)
    dc_old = dc_new * f
    dh_old = lax.dot(dz, kernel_h_t)[:, :hidden]
    if v is not None:
      dc_old = jnp.where(keep, dc_old, dc)
      dh_old = jnp.where(keep, dh_old, dh)
    return (dc_old, dh_old), dz

  (dc0, dh0), dzs = lax.scan(step, (dc_last, dh_last),
                             (dys, acts, cs, c_prev, valid),
                             reverse=not reverse, unroll=unroll)
  # dz is zero at padded steps, so they add nothing below. The kernel's rows
  # act on [h, x], the bias on a constant 1: one matmul gives both.
  flat = lambda a: a.reshape(-1, a.shape[-1])
  h_prev = _previous(hs, h0, reverse)
  ones = jnp.ones((*xs.shape[:-1], 1), xs.dtype)
  inputs = jnp.concatenate([h_prev, xs, ones], -1)  # [time, batch, h + x + 1]
  dparams = lax.dot_general(flat(inputs), flat(dzs), (((0,), (0,)), ((), ())))
  dxs = lax.dot(flat(dzs), kernel_t[:, hidden:])
  return (dparams[:-1].astype(kernel.dtype), dparams[-1].astype(kernel.dtype),
          dxs.reshape(xs.shape).astype(xs.dtype), dc0, dh0, None)


lstm_over_time.defvjp(_lstm_fwd, _lstm_bwd)
