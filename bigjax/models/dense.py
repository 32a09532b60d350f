"""The matmul of every dense layer, with a backward pass XLA compiles well.

`dot_general` is what `nn.Dense` and `nn.DenseGeneral` are given as their
`dot_general`: the same product as `lax.dot_general`, and the same gradients,
but with the weight gradient written in the form the CPU's matmul runs at
full speed.

Why: for y = x @ W with x [..., K] and W [K, N], JAX's transpose rule forms
dW as (dy^T x)^T, a dot followed by a transpose. XLA:CPU folds the transpose
into the operands' layouts, materialises dy transposed and runs a matmul with
both operands transposed: the 4-layer GPT of `benchmarks.run` spent 55-82 ms
on each of its feed-forward weight gradients (48-78 GFLOP/s) plus 22 ms on
each transposing copy, against 27 ms (160 GFLOP/s) for the forward matmuls
of the same size. Written directly as x^T dy over the flattened leading axes
(one dot contracting dimension 0 of both operands), the same gradient runs
at forward speed with no copy. The forward pass and dx are unchanged.

Only the dense-layer pattern takes this path: no batch dimensions, x's
contracting dimensions its trailing ones and W's its leading ones, in the
same order (`nn.Dense`, `nn.DenseGeneral` over trailing axes). Anything else
is passed to `lax.dot_general` untouched.
"""

import functools
import math

import jax
from jax import lax


def dot_general(lhs, rhs, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs):
  """`lax.dot_general`, with a dense layer's weight gradient as x^T dy."""
  (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
  k = len(lhs_contract)
  dense_layer = (
      not lhs_batch and not rhs_batch and not kwargs and k > 0
      and tuple(lhs_contract) == tuple(range(lhs.ndim - k, lhs.ndim))
      and tuple(rhs_contract) == tuple(range(k)))
  if not dense_layer:
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return _dense_dot(lhs, rhs, k, precision, preferred_element_type)


def matmul(x, w):
  """x [..., K] @ w [K, N] -> [..., N] through `dot_general` (the recurrent
  cells' products, made inside `nn.scan`)."""
  return dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _dense_dot(x, w, k, precision, preferred_element_type):
  """x [*batch, *contract] . w [*contract, *out] -> [*batch, *out], as 2D."""
  batch_shape, contract_shape = x.shape[:x.ndim - k], x.shape[x.ndim - k:]
  out_shape = w.shape[k:]
  y = lax.dot_general(
      x.reshape(-1, math.prod(contract_shape)),
      w.reshape(math.prod(contract_shape), -1), (((1,), (0,)), ((), ())),
      precision=precision, preferred_element_type=preferred_element_type)
  return y.reshape(*batch_shape, *out_shape)


def _dense_dot_fwd(x, w, k, precision, preferred_element_type):
  return _dense_dot(x, w, k, precision, preferred_element_type), (x, w)


def _dense_dot_bwd(k, precision, preferred_element_type, residuals, dy):
  del preferred_element_type  # The cotangents take the primals' dtypes.
  x, w = residuals
  contract = math.prod(x.shape[x.ndim - k:])
  x2 = x.reshape(-1, contract)                 # [M, K]
  w2 = w.reshape(contract, -1)                 # [K, N]
  dy2 = dy.reshape(x2.shape[0], w2.shape[1])   # [M, N]
  # dx = dy W^T: contract N, W^T [N, K] materialised first (it is small).
  wt = lax.optimization_barrier(w2.T)
  dx = lax.dot_general(dy2, wt, (((1,), (0,)), ((), ())), precision=precision,
                       preferred_element_type=x.dtype)
  # dW = x^T dy: contract M, dimension 0 of both, the narrower of K and N
  # as the result's rows.
  if w2.shape[0] <= w2.shape[1]:
    dw = lax.dot_general(x2, dy2, (((0,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=w.dtype)
  else:
    dwt = lax.dot_general(dy2, x2, (((0,), (0,)), ((), ())),
                          precision=precision, preferred_element_type=w.dtype)
    dw = lax.optimization_barrier(dwt).T
  return dx.reshape(x.shape), dw.reshape(w.shape)


_dense_dot.defvjp(_dense_dot_fwd, _dense_dot_bwd)
