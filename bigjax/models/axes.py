"""The logical axis names that parameters carry, in one place.

Every parameter of every model is created through `logical(init, names)`, so
it is boxed with one name per dimension. `config.sharding_rules` and the
presets in `bigjax.sharding` map these names to mesh axes; a name no rule
maps (or `None`) leaves that dimension replicated. Models never mention mesh
axes, so one model runs unchanged on any mesh.

The vocabulary (shapes as the parameters have them):

  batch       examples of a batch (activations and data only, never weights).
  embed       the model width entering a dense layer: the Transformer's
              d_model, the CNN's flattened features, a recurrent input.
  mlp         the hidden width of a feed-forward layer or dense hidden layer:
              column-split by tensor parallelism in the first matmul and
              row-split in the second (Megatron-style).
  heads       attention heads (tensor parallelism splits heads).
  kv          per-head query/key/value features.
  vocab       token vocabulary (embedding rows, LM-head columns).
  classes     classifier outputs.
  conv_in     input channels of a convolution kernel.
  conv_out    output channels of a convolution (and its bias / norm).
  rnn_in      rows of a recurrent kernel: [previous hidden state, input].
  rnn_gates   the gate columns of a recurrent kernel (gates * hidden).
  rnn_hidden  a recurrent layer's hidden state (the features it outputs).
  layers      the stacked depth axis that `nn.scan` over layers adds.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax

# Every logical name a model may use; `bigjax.sharding` rejects rules that
# name anything else (a typo would otherwise silently replicate).
LOGICAL_AXES = ('batch', 'embed', 'mlp', 'heads', 'kv', 'vocab', 'classes',
                'conv_in', 'conv_out', 'rnn_in', 'rnn_gates', 'rnn_hidden',
                'layers')


def logical(init, names: Sequence[Optional[str]]):
  """`init` whose parameter is boxed with logical axis `names` (one per dim)."""
  return nn.with_logical_partitioning(init, tuple(names))


def dense(features: int, names: tuple[Optional[str], Optional[str]], **kwargs):
  """An `nn.Dense` whose kernel is named `names` and whose bias `names[1:]`.

  Flax's default initialisers are kept (LeCun-normal kernel, zero bias).
  """
  return nn.Dense(
      features,
      kernel_init=logical(nn.initializers.lecun_normal(), names),
      bias_init=logical(nn.initializers.zeros_init(), names[1:]),
      **kwargs)


def path_text(path) -> str:
  """A parameter's tree path as 'encoder/layers/mlp/wi/kernel', the form
  reports, sharding tables and optimizer group patterns use."""
  return jax.tree_util.keystr(path, simple=True, separator='/')
