"""FLOPs of a traced computation: its matrix products and convolutions.

The count behind compute-matched ablations (`bigjax/ablation.py`): the
multiply-adds (x2) of every dot_general and conv_general_dilated that a
function traces to, with each scan body counted `length` times. That is the
usual "model FLOPs" convention (Kaplan et al. 2020; PaLM's MFU): the
normalisations, activations and optimiser update it leaves out are
memory-bound and a few percent of a step.

Why not XLA's own count, `compiled.cost_analysis()['flops']`: it counts a
while loop's body once whatever its trip count (jaxlib 0.10.2), and every
Transformer here scans its layers and every RNN its time steps. Measured:
XLA gives the copy-task LSTM 112M FLOPs per step at length 8 and 118M at
length 16, and a 6-layer character Transformer the FLOPs of about one
layer. It also needs a compile (10-40 s on the 2-core machine); tracing
takes a second or two.

Dead code counts too (XLA removes it after tracing), so the figure is an
upper bound where a backward rule recomputes part of the forward pass.
"""

import math

import jax
from jax.extend import core as jax_core


def jaxpr_flops(fn, *args) -> float:
  """FLOPs of the matmuls and convolutions `fn(*args)` traces to.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments; arrays or `jax.ShapeDtypeStruct`s (nothing runs).
  """
  return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def _sub_jaxprs(value):
  """The jaxprs a primitive's parameter holds (scan, cond, pjit, remat...)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _count(jaxpr) -> float:
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    out = eqn.outvars[0].aval.shape if eqn.outvars else ()
    if name == 'dot_general':
      (contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(out) * math.prod(lhs[d] for d in contracting)
    elif name == 'conv_general_dilated':
      # Each output element sums (input channels / groups) x kernel window
      # products; the kernel's in-dimension already holds channels / groups.
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, *spatial)
      total += 2.0 * math.prod(out) * rhs[spec[1]] * math.prod(
          rhs[d] for d in spec[2:])
    elif (name in ('jit', 'pjit')
          and eqn.params.get('name') == 'conv_by_taps'):
      # A convolution written as a sum over its taps (bigjax.models.cnn):
      # each output element sums window x input channels products.
      kernel = eqn.invars[1].aval.shape  # [*window, in, out]
      total += 2.0 * math.prod(out) * math.prod(kernel[:-1])
      continue
    elif (name in ('jit', 'pjit')
          and eqn.params.get('name') == 'weighted_row_sum'):
      # A normalisation's row sum written as a product with a vector
      # (bigjax.models.layer_norm): not model FLOPs.
      continue
    inner = [_count(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
    if not inner:
      continue
    if name == 'cond':  # One branch runs.
      total += max(inner)
    else:  # A while loop's trip count is unknown when traced: counted once.
      total += (eqn.params['length'] if name == 'scan' else 1) * sum(inner)
  return total
