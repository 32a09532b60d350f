"""Mixed precision: the dtype parameters are stored in and the dtype of compute.

A `Policy` (from `config.precision`) is applied around the model call of the
train and eval steps, so no model needs a dtype argument:
  * parameters are created in float32 and stored in `param_dtype`: the master
    copy that gradients, the optimizer state and checkpoints have;
  * at each call they and the floating inputs (images) are cast to
    `compute_dtype`, so every matmul and convolution, forward and backward,
    runs in it (the gradient of the cast brings gradients back to
    `param_dtype`);
  * the logits come back in float32 and the loss is computed in float32.
Inside the models, softmax (attention) and normalisation statistics are
computed in float32 whatever the compute dtype (the attention kernels and
flax's LayerNorm/BatchNorm do it), and model state such as BatchNorm's running
averages is never cast: it stays float32.

The usual policy on accelerators is param_dtype float32 with compute_dtype
bfloat16 (Micikevicius et al. 2018, without loss scaling: bfloat16 has
float32's exponent range). CPUs without bfloat16 matmul units run it slower
than float32.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

# Config names -> dtypes. float16 is left out: it needs loss scaling.
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def _cast_floating(tree, dtype):
  """`tree` with its floating-point leaves cast to `dtype` (others as they are)."""
  def cast(x):
    if jnp.issubdtype(jnp.result_type(x), jnp.floating):
      return jnp.asarray(x, dtype)
    return x
  return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
  """The dtypes of stored parameters and of compute (see the module doc)."""
  param_dtype: Any = jnp.float32
  compute_dtype: Any = jnp.float32

  def cast_to_param(self, tree):
    return _cast_floating(tree, self.param_dtype)

  def cast_to_compute(self, tree):
    return _cast_floating(tree, self.compute_dtype)

  @staticmethod
  def cast_to_output(logits):
    """Logits in float32, for a float32 softmax and loss."""
    return _cast_floating(logits, jnp.float32)


FLOAT32 = Policy()


def from_config(precision_config) -> Policy:
  """The Policy of `config.precision` (names already validated)."""
  return Policy(param_dtype=DTYPES[precision_config.param_dtype],
                compute_dtype=DTYPES[precision_config.compute_dtype])
