"""Gated recurrence: Elman, LSTM and GRU cells, one scan over time, stacks.

Parameters are shared over time (one cell applied at every step), which is
the nature of a recurrent layer and is not counted as extra parameters;
`cross_layer_sharing='all'` additionally shares one cell across stacked
layers and declares it for `param_counts`.

Cells follow flax's cell protocol, `cell(carry, x_t) -> (carry, y_t)` with
`cell.initialize_carry(rng, input_shape)`, so `Recurrence` also runs flax's
own cells (the tests use that to compare against them). Their parameters are
laid out for speed: every gate of a step comes out of one matmul.
`Recurrence` and `RecurrentLayer` take no `train`: nothing in them acts
differently in training; dropout lives between layers, in `RecurrentStack`.

Models: `RNNClassifier` (images row by row), `RNNLM` (language model) and
`RNNSeq2Seq` (encoder-decoder, optionally with attention). For decoding
(`bigjax.decoding`) the token models take `decode=True`: their cache is the
carries, which stacks pass in (`initial_carries`) and out
(`return_carries`); a step costs the same at any length.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bigjax.models import attention as attention_lib
from bigjax.models import axes
from bigjax.models import dense
from bigjax.models import fused_lstm
from bigjax.models import param_counts
# For TokenEmbedding only: one embedding (and tied output layer) for every
# token model.
from bigjax.models import transformer


def _blocks(init, n: int):
  """An initializer of a [rows, n * cols] kernel as n independent blocks.

  An orthogonal init over the whole [h, 4h] kernel would make its rows, not
  each gate's [h, h] block, orthonormal (and each block smaller); the gates
  should each start as flax's do.
  """
  def init_fn(key, shape, dtype=jnp.float32):
    rows, cols = shape
    keys = jax.random.split(key, n)
    return jnp.concatenate([init(k, (rows, cols // n), dtype) for k in keys], 1)
  return init_fn


# Logical axes of recurrent kernels [rows, gates * hidden] and their biases.
# Tensor parallelism splits the gate columns, so each device computes a block
# of gate pre-activations from the whole [h, x].
_KERNEL_AXES = ('rnn_in', 'rnn_gates')
_BIAS_AXES = ('rnn_gates',)


def _stacked_kernel(module, name, *, hidden: int, inputs: int, gates: int):
  """A [hidden + inputs, gates * hidden] kernel acting on concat([h, x]).

  The first `hidden` rows act on the previous state and start orthogonal per
  gate; the last `inputs` rows act on the input and start LeCun-normal, the
  same initialisation flax gives its separate recurrent and input kernels.
  """
  recurrent_init = _blocks(nn.initializers.orthogonal(), gates)
  input_init = nn.initializers.lecun_normal()

  def init_fn(key, shape, dtype=jnp.float32):
    k_h, k_x = jax.random.split(key)
    return jnp.concatenate([
        recurrent_init(k_h, (hidden, shape[1]), dtype),
        input_init(k_x, (inputs, shape[1]), dtype)], 0)
  return module.param(name, axes.logical(init_fn, _KERNEL_AXES),
                      (hidden + inputs, gates * hidden), module.param_dtype)


class _HiddenStateCell(nn.RNNCellBase):
  """Cells whose carry is one hidden state h [batch, features] (Elman, GRU).

  Subclasses declare `features` and `param_dtype`.
  """

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    """Zeros [*input_shape[:-1], features]; `rng` is unused (flax protocol)."""
    del rng
    return jnp.zeros((*input_shape[:-1], self.features), self.param_dtype)

  @property
  def num_feature_axes(self) -> int:
    return 1


class ElmanCell(_HiddenStateCell):
  """h_t = activation(kernel^T [h_{t-1}, x_t] + bias).

  Parameters: kernel [features + input, features] (rows for h first, then
  for x), bias [features]. Carry and output: h [batch, features].
  """
  features: int
  activation: Callable[[jax.Array], jax.Array] = jnp.tanh
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, x):
    """carry [batch, features], x [batch, input] -> (h, h) [batch, features]."""
    kernel = _stacked_kernel(self, 'kernel', hidden=self.features,
                             inputs=x.shape[-1], gates=1)
    bias = self.param('bias',
                      axes.logical(nn.initializers.zeros_init(), _BIAS_AXES),
                      (self.features,), self.param_dtype)
    h = self.activation(
        dense.matmul(jnp.concatenate([carry, x], -1), kernel) + bias)
    return h, h


class LSTMCell(nn.RNNCellBase):
  """LSTM with all four gates from one matmul over concat([h, x]).

  i, f, o = sigmoid(.), g = tanh(.) of kernel^T [h, x] + bias;
  c' = f * c + i * g; h' = o * tanh(c').

  Parameters: kernel [features + input, 4 * features], bias [4 * features].
  Columns are the gates in flax's order (i, f, g, o), each `features` wide;
  rows are h first, then x. So flax's `OptimizedLSTMCell` parameters map as
    kernel = [[hi, hf, hg, ho], [ii, if, ig, io]] (kernels, blocks by row),
    bias = [hi, hf, hg, ho] (biases; flax's input kernels have none).

  Attributes:
    features: hidden size.
    forget_bias: initial forget-gate bias. 1.0 (Gers et al. 2000,
      Jozefowicz et al. 2015) keeps the cell remembering at the start of
      training, so gradients reach early steps (here: the top image rows).
    param_dtype: dtype of parameters and of the zero carry.
  """
  features: int
  forget_bias: float = 1.0
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, x):
    """carry (c, h), each [batch, features]; x [batch, input].

    Returns:
      ((c', h'), h'), all [batch, features].
    """
    c, h = carry
    n = self.features
    kernel = _stacked_kernel(self, 'kernel', hidden=n, inputs=x.shape[-1],
                             gates=4)

    def bias_init(key, shape, dtype=jnp.float32):
      del key
      return jnp.zeros(shape, dtype).at[n:2 * n].set(self.forget_bias)
    bias = self.param('bias', axes.logical(bias_init, _BIAS_AXES), (4 * n,),
                      self.param_dtype)

    _, c, h = fused_lstm.step(kernel, bias, c, h, x)
    return (c, h), h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    """(c, h) zeros [*input_shape[:-1], features]; `rng` is unused."""
    del rng
    zeros = jnp.zeros((*input_shape[:-1], self.features), self.param_dtype)
    return zeros, zeros

  @property
  def num_feature_axes(self) -> int:
    return 1


class GRUCell(_HiddenStateCell):
  """GRU with flax's formula, its gates from two matmuls (one for x, one for h).

  r = sigmoid(W_ir x + b_ir + W_hr h), z = sigmoid(W_iz x + b_iz + W_hz h),
  n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h.

  `r` scales only the recurrent part of n, so x and h cannot share one
  matmul as in the LSTM. Parameters (columns in gate order r, z, n):
  input_kernel [input, 3 * features], input_bias [3 * features],
  recurrent_kernel [features, 3 * features], recurrent_bias [features] (b_hn).
  flax's `GRUCell` maps as input_kernel = [ir, iz, in], input_bias =
  [ir, iz, in] biases, recurrent_kernel = [hr, hz, hn], recurrent_bias = hn.
  """
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, carry, x):
    """h [batch, features], x [batch, input] -> (h', h') [batch, features]."""
    n = self.features
    zeros = nn.initializers.zeros_init()
    w_x = self.param(
        'input_kernel',
        axes.logical(_blocks(nn.initializers.lecun_normal(), 3), _KERNEL_AXES),
        (x.shape[-1], 3 * n), self.param_dtype)
    b_x = self.param('input_bias', axes.logical(zeros, _BIAS_AXES), (3 * n,),
                     self.param_dtype)
    w_h = self.param(
        'recurrent_kernel',
        axes.logical(_blocks(nn.initializers.orthogonal(), 3), _KERNEL_AXES),
        (n, 3 * n), self.param_dtype)
    b_hn = self.param('recurrent_bias', axes.logical(zeros, ('rnn_hidden',)),
                      (n,), self.param_dtype)
    xr, xz, xn = jnp.split(dense.matmul(x, w_x) + b_x, 3, axis=-1)
    hr, hz, hn = jnp.split(dense.matmul(carry, w_h), 3, axis=-1)
    r = jax.nn.sigmoid(xr + hr)
    z = jax.nn.sigmoid(xz + hz)
    new = jnp.tanh(xn + r * (hn + b_hn))
    h = (1.0 - z) * new + z * carry
    return h, h


CELLS = {'elman': ElmanCell, 'lstm': LSTMCell, 'gru': GRUCell}
SHARING = ('none', 'all')
POOLING = ('last', 'mean')
ATTENTION = ('none',) + attention_lib.SCORES


def _check_choice(name: str, value, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{name}={value!r} is not one of '
                     f"{', '.join(repr(a) for a in allowed)}")


class Recurrence(nn.Module):
  """Runs `cell` over the time axis with one `nn.scan` (the only one here).

  The cell's parameters are broadcast over time (created once, applied at
  every step). With `lengths`, steps at or past a sequence's length leave its
  carry unchanged and output zeros, so the final carry is the state after its
  true last token. With `reverse=True` the scan runs from the last position
  to the first; the padded tail then comes first and changes nothing, so the
  backward pass over each sequence starts at its last valid token.

  Our `LSTMCell` runs through `fused_lstm.lstm_over_time` once its
  parameters exist: the same step with a written-out backward pass, 17%
  faster to train; the scan creates the parameters at init.

  Attributes:
    cell: a cell following flax's protocol (any of CELLS, or flax's own).
    reverse: scan from the end of the sequence to its start.
    unroll: time steps per scan iteration (1 was fastest here for LSTMs).
  """
  cell: nn.RNNCellBase
  reverse: bool = False
  unroll: int = 1

  @nn.compact
  def __call__(self, xs, *, lengths=None, initial_carry=None):
    """Runs the cell over a batch of sequences.

    Args:
      xs: [batch, time, input].
      lengths: optional int [batch], valid steps of each sequence (its
        padding is at the end); None means all `time` steps are valid.
      initial_carry: the carry to start from (leaves [batch, ...], e.g. an
        encoder's final state, or the state a decode step left); None: the
        cell's zero carry.

    Returns:
      (carry, ys): the cell's carry after each sequence's last processed
      step (leaves [batch, ...]) and outputs ys [batch, time, features],
      zero at padded positions.
    """
    time = xs.shape[1]
    carry = initial_carry
    if carry is None:
      # Zero initialisers ignore the key; a fixed one keeps flax's cells
      # happy without needing an rng stream at apply time.
      carry = self.cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
      # In the inputs' dtype, so a bfloat16 run (bigjax.precision) keeps its
      # recurrent matmuls in bfloat16.
      carry = jax.tree.map(lambda c: c.astype(xs.dtype), carry)
    valid = None
    if lengths is not None:
      valid = jnp.arange(time)[None, :] < lengths[:, None]  # [batch, time]

    if type(self.cell) is LSTMCell and not self.is_initializing():
      # The same computation with a written-out backward (fused_lstm). At
      # init the scan below creates the cell's parameters.
      params = nn.unbox(self.cell.variables['params'])
      carry, ys = fused_lstm.lstm_over_time(
          params['kernel'], params['bias'], xs.swapaxes(0, 1), *carry,
          None if valid is None else valid.T, self.reverse, self.unroll)
      return carry, ys.swapaxes(0, 1)

    def step(cell, carry, inputs):
      x_t, valid_t = inputs
      new_carry, y_t = cell(carry, x_t)
      if valid_t is None:  # Traced once: no masking cost when unpadded.
        return new_carry, y_t
      # `where`, not a 0/1 multiply: padded content (even inf or NaN) cannot
      # leak into the carry or the outputs.
      keep = lambda new, old: jnp.where(valid_t[:, None], new, old)
      return (jax.tree.map(keep, new_carry, carry),
              jnp.where(valid_t[:, None], y_t, 0))

    scan = nn.scan(step, variable_broadcast='params',
                   split_rngs={'params': False}, in_axes=1, out_axes=1,
                   reverse=self.reverse, unroll=self.unroll)
    return scan(self.cell, carry, (xs, valid))


class RecurrentLayer(nn.Module):
  """One recurrent layer: a forward `Recurrence`, plus a backward one.

  Attributes:
    cell: 'elman', 'lstm' or 'gru'.
    hidden_size: features of each direction's cell.
    bidirectional: also run a separately parameterised backward direction and
      concatenate its outputs after the forward ones.
    unroll: passed to `Recurrence`.
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  bidirectional: bool = False
  unroll: int = 1

  @nn.compact
  def __call__(self, xs, *, lengths=None, initial_carry=None,
               return_carry: bool = False):
    """xs [batch, time, input], lengths optional int [batch].

    Args:
      xs, lengths: see `Recurrence`.
      initial_carry: the forward cell's starting carry (None: zeros).
      return_carry: also return the forward cell's final carry.
      Both carry arguments need a unidirectional layer: a backward cell's
      state at t=0 cannot continue a sequence.

    Returns:
      ys [batch, time, directions * hidden_size] (zero where padded) and
      last [batch, directions * hidden_size]: each direction's output after
      its final step (forward: at the last valid token; backward: at t=0);
      with return_carry also the final carry (leaves [batch, hidden_size]).
    """
    if self.bidirectional and (initial_carry is not None or return_carry):
      raise ValueError('carries in or out need a unidirectional layer '
                       '(bidirectional=False)')
    # parent=None: the cell is adopted by its Recurrence (params under
    # 'forward/cell'), not attached here as a sibling 'LSTMCell_0'.
    make_cell = lambda: CELLS[self.cell](self.hidden_size, parent=None)
    forward = Recurrence(make_cell(), unroll=self.unroll, name='forward')
    carry, ys = forward(xs, lengths=lengths, initial_carry=initial_carry)
    if lengths is None:
      last = ys[:, -1]
    else:
      # All of a zero-length sequence's outputs are zero: index 0 is as good.
      index = jnp.maximum(lengths - 1, 0)[:, None, None]
      last = jnp.take_along_axis(ys, index, axis=1)[:, 0]
    if not self.bidirectional:
      return (ys, last, carry) if return_carry else (ys, last)
    backward = Recurrence(make_cell(), reverse=True, unroll=self.unroll,
                          name='backward')
    ys_back = backward(xs, lengths=lengths)[1]
    return (jnp.concatenate([ys, ys_back], -1),
            jnp.concatenate([last, ys_back[:, 0]], -1))


def _run_layers(layers, xs, *, dropout_rate, train, lengths,
                initial_carries=None, return_carries=False):
  """Applies `layers` in order with dropout between them.

  Layer i starts from initial_carries[i] when given. Returns the top layer's
  (ys, last), as `RecurrentLayer` does, and with return_carries also every
  layer's final carry (a tuple, bottom layer first).
  """
  last, carries = None, []
  for i, layer in enumerate(layers):
    if i > 0:
      xs = nn.Dropout(dropout_rate, deterministic=not train)(xs)
    start = None if initial_carries is None else initial_carries[i]
    if return_carries:
      xs, last, carry = layer(xs, lengths=lengths, initial_carry=start,
                              return_carry=True)
      carries.append(carry)
    else:
      xs, last = layer(xs, lengths=lengths, initial_carry=start)
  return (xs, last, tuple(carries)) if return_carries else (xs, last)


class SharedLayers(nn.Module):
  """One `RecurrentLayer` applied `num_layers` times (cross-layer sharing).

  A Python loop rather than an `nn.scan` over depth: stacks are a few layers
  deep, and unrolled depth keeps each layer's time scan as fast as an
  unshared one. The layer's parameters are declared used `num_layers` times
  for `param_counts`; its input must already have the layer's output size.

  Attributes:
    cell, hidden_size, bidirectional, unroll: the shared `RecurrentLayer`'s.
    num_layers: times the layer is applied.
    dropout_rate: dropout between applications.
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  bidirectional: bool = False
  unroll: int = 1
  num_layers: int = 2
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, xs, *, train: bool, lengths=None, initial_carries=None,
               return_carries: bool = False):
    """xs [batch, time, directions * hidden_size] -> (ys, last) of the top.

    Carries in and out (one per application) as in `RecurrentStack`.
    """
    param_counts.declare_uses(self, self.num_layers)
    layer = RecurrentLayer(cell=self.cell, hidden_size=self.hidden_size,
                           bidirectional=self.bidirectional,
                           unroll=self.unroll, name='layer')
    return _run_layers([layer] * self.num_layers, xs,
                       dropout_rate=self.dropout_rate, train=train,
                       lengths=lengths, initial_carries=initial_carries,
                       return_carries=return_carries)


class RecurrentStack(nn.Module):
  """`num_layers` stacked (optionally bidirectional) recurrent layers.

  Attributes:
    cell: 'elman', 'lstm' or 'gru'.
    hidden_size: features of each direction's cell.
    num_layers: stacked layers; layer l > 1 reads layer l-1's outputs.
    bidirectional: each layer also runs backward; outputs concatenate.
    cross_layer_sharing: 'none', or 'all' for one cell per direction shared
      by every layer. Sharing needs equal input sizes at every layer, so with
      'all' the input is first projected (Dense, name 'input_projection') to
      directions * hidden_size, the size of every layer's output.
    dropout_rate: dropout between layers (not on the input or the output).
    unroll: passed to `Recurrence`.
  """
  cell: str = 'lstm'
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = False
  cross_layer_sharing: str = 'none'
  dropout_rate: float = 0.0
  unroll: int = 1

  @nn.compact
  def __call__(self, xs, *, train: bool, lengths=None, initial_carries=None,
               return_carries: bool = False):
    """xs [batch, time, input], lengths optional int [batch].

    Args:
      xs, lengths: see `Recurrence`.
      initial_carries: one starting carry per layer (bottom first), e.g. an
        encoder's final carries or those a decode step left; None: zeros.
      return_carries: also return every layer's final carry.
      The carry arguments need bidirectional=False.

    Returns:
      The top layer's ys [batch, time, directions * hidden_size] (zero where
      padded) and last [batch, directions * hidden_size] (see RecurrentLayer),
      and with return_carries the tuple of each layer's final carry.
    """
    _check_choice('cell', self.cell, tuple(CELLS))
    _check_choice('cross_layer_sharing', self.cross_layer_sharing, SHARING)
    layer_args = dict(cell=self.cell, hidden_size=self.hidden_size,
                      bidirectional=self.bidirectional, unroll=self.unroll)
    if self.cross_layer_sharing == 'all':
      width = self.hidden_size * (2 if self.bidirectional else 1)
      xs = axes.dense(width, ('embed', 'rnn_hidden'),
                      name='input_projection')(xs)
      return SharedLayers(**layer_args, num_layers=self.num_layers,
                          dropout_rate=self.dropout_rate, name='shared')(
                              xs, train=train, lengths=lengths,
                              initial_carries=initial_carries,
                              return_carries=return_carries)
    layers = [RecurrentLayer(**layer_args, name=f'layer{i}')
              for i in range(self.num_layers)]
    return _run_layers(layers, xs, dropout_rate=self.dropout_rate,
                       train=train, lengths=lengths,
                       initial_carries=initial_carries,
                       return_carries=return_carries)


class RNNClassifier(nn.Module):
  """Reads an image row by row with a recurrent stack and classifies it.

  An image [batch, H, W, C] is a sequence of H steps of W * C features (28
  steps of 28 for Fashion-MNIST). The head sees the top layer's final
  output(s) ('last'; with `bidirectional`, the forward state after the bottom
  row and the backward state after the top row) or its mean over time
  ('mean'), after dropout.

  Attributes:
    num_classes: size of the output logits.
    cell: 'elman', 'lstm' or 'gru'.
    hidden_size: features of each direction's cell.
    num_layers: stacked recurrent layers.
    bidirectional: run each layer in both directions.
    cross_layer_sharing: 'none' or 'all' (see RecurrentStack).
    dropout_rate: dropout between layers and before the head.
    pooling: 'last' or 'mean'.
    unroll: time steps per scan iteration.
  """
  num_classes: int = 10
  cell: str = 'lstm'
  hidden_size: int = 128
  num_layers: int = 1
  bidirectional: bool = False
  cross_layer_sharing: str = 'none'
  dropout_rate: float = 0.0
  pooling: str = 'last'
  unroll: int = 1

  @nn.compact
  def __call__(self, x, *, train: bool):
    """[batch, height, width, channels] float images -> [batch, num_classes]."""
    _check_choice('pooling', self.pooling, POOLING)
    xs = x.reshape(x.shape[0], x.shape[1], -1)
    ys, last = RecurrentStack(
        cell=self.cell, hidden_size=self.hidden_size,
        num_layers=self.num_layers, bidirectional=self.bidirectional,
        cross_layer_sharing=self.cross_layer_sharing,
        dropout_rate=self.dropout_rate, unroll=self.unroll,
        name='rnn')(xs, train=train)
    features = last if self.pooling == 'last' else ys.mean(axis=1)
    features = nn.Dropout(self.dropout_rate, deterministic=not train)(features)
    return axes.dense(self.num_classes, ('rnn_hidden', 'classes'),
                      name='head')(features)


def _dropout(rate: float, train: bool):
  return nn.Dropout(rate, deterministic=not train)


def _token_logits(embed, h, *, tie: bool, vocab_size: int):
  """h [..., hidden] -> logits [..., vocab_size], inside a compact method.

  Untied: a bias-free Dense 'logits' named ('embed', 'vocab') as the
  Transformers' untied output (the width entering a dense layer is 'embed'),
  so tensor parallelism splits the vocabulary. Tied: through the
  embedding's transpose, after a bias-free projection 'output_projection'
  when the hidden width differs from the embedding's.
  """
  if not tie:
    return axes.dense(vocab_size, ('embed', 'vocab'), use_bias=False,
                      name='logits')(h)
  if h.shape[-1] != embed.features:
    h = axes.dense(embed.features, ('rnn_hidden', 'embed'), use_bias=False,
                   name='output_projection')(h)
  return embed.attend(h)


def _lengths(valid):
  """int [batch] valid steps of bool [batch, time] (True on a prefix)."""
  return None if valid is None else jnp.sum(valid, axis=1, dtype=jnp.int32)


class _TokenRNNFields(nn.Module):
  """Hyperparameters both token RNNs take (config.model keys).

  Attributes:
    vocab_size: number of token ids.
    cell: 'elman', 'lstm' or 'gru'.
    hidden_size: features of each layer's cell.
    num_layers: stacked layers (of each stack, for RNNSeq2Seq).
    embedding_dim: width of the token embedding (None: hidden_size).
    dropout_rate: on the embeddings, between layers and before the logits.
    tie_embeddings: logits through the embedding table (Press & Wolf 2017),
      via 'output_projection' when hidden_size differs from its width.
    unroll: time steps per scan iteration.
  """
  vocab_size: int = 256
  cell: str = 'lstm'
  hidden_size: int = 256
  num_layers: int = 1
  embedding_dim: Optional[int] = None
  dropout_rate: float = 0.0
  tie_embeddings: bool = False
  unroll: int = 1


class RNNLM(_TokenRNNFields):
  """Recurrent language model: token embedding -> RecurrentStack -> logits.

  Dropout (Zaremba et al. 2014) acts on the embeddings, between layers and
  on the top layer's outputs. With `tie_embeddings` the logits reuse the
  embedding table (Press & Wolf 2017), through 'output_projection' when
  hidden_size differs from the embedding width.

  With `decode=True` (and the 'cache' collection mutable) the tokens continue
  from the carries in 'cache'/'carries' (one per layer, batch-first): the
  recurrent state is the whole cache.

  Attributes (beyond _TokenRNNFields'):
    cross_layer_sharing: 'none' or 'all' (see RecurrentStack).
  """
  cross_layer_sharing: str = 'none'
  # The task whose inputs this model reads (`bigjax.decoding` builds its
  # decode calls from it).
  TASK = 'language_model'

  @nn.compact
  def __call__(self, tokens, *, train: bool, valid=None, decode: bool = False):
    """int [batch, length] -> logits [batch, length, vocab_size].

    Position t's logits depend on tokens[:, :t+1] only (and, in decode mode,
    on the cached state). `valid` (bool [batch, length], True on a prefix of
    each row) stops each row's state at its last valid token.
    """
    embed = transformer.TokenEmbedding(
        self.vocab_size, self.embedding_dim or self.hidden_size, name='embed')
    x = _dropout(self.dropout_rate, train)(embed(tokens))
    ys, _, carries = RecurrentStack(
        cell=self.cell, hidden_size=self.hidden_size,
        num_layers=self.num_layers,
        cross_layer_sharing=self.cross_layer_sharing,
        dropout_rate=self.dropout_rate, unroll=self.unroll, name='rnn')(
            x, train=train, lengths=_lengths(valid), return_carries=True,
            initial_carries=(self.get_variable('cache', 'carries')
                             if decode else None))
    if decode:
      self.put_variable('cache', 'carries', carries)
    return _token_logits(embed, _dropout(self.dropout_rate, train)(ys),
                         tie=self.tie_embeddings, vocab_size=self.vocab_size)


class RNNSeq2Seq(_TokenRNNFields):
  """Recurrent encoder-decoder (Sutskever et al. 2014), optionally attentive.

  Source and target share one token embedding. The encoder, a
  unidirectional RecurrentStack over the source, stops at each row's last
  valid token; its final carries start the decoder, a RecurrentStack of the
  same cell and size over the (shifted) target. Without attention those
  carries are all the decoder knows of the source.

  With attention (Luong et al. 2015) each decoder state s_t attends over the
  encoder states, masked by src_valid (`attention.Seq2SeqAttention`:
  'additive' is Bahdanau et al.'s score, 'dot' Luong's), and the context c_t
  gives the attentional state tanh(W_c [c_t; s_t]) ('attention_output')
  from which the logits come. The attention reads s_t after the step, so in
  training the recurrence is one scan and the attention one batched op.
  (Bahdanau et al.'s decoder instead feeds c_t into the next step, which
  would put attention inside the scan; only the score is theirs here.)

  With `decode=True` (and the 'cache' collection mutable) 'tgt' continues
  the cached decoder state: the first call passes 'src' (and 'src_valid'),
  which runs the encoder and caches its projected states for the attention;
  later calls pass only 'tgt'.

  Attributes (beyond _TokenRNNFields'; the vocabulary, cell and sizes are
  shared by encoder and decoder):
    attention: 'none', 'additive' or 'dot'.
  """
  attention: str = 'additive'
  TASK = 'seq2seq'  # See RNNLM.TASK.

  @nn.compact
  def __call__(self, inputs, *, train: bool, decode: bool = False):
    """Target logits given the source and the (shifted) target.

    Args:
      inputs: {'src': int [batch, src_len], 'tgt': int [batch, tgt_len],
        optional 'src_valid': bool [batch, src_len], optional 'tgt_valid':
        bool [batch, tgt_len]} (valid: True on a prefix of each row).
        Position t of 'tgt' predicts token t + 1. Decode calls after the
        first leave out 'src' and 'src_valid'.
      train: enables dropout.
      decode: continue the cached target (class doc).

    Returns:
      logits [batch, tgt_len, vocab_size].
    """
    _check_choice('attention', self.attention, ATTENTION)
    embed = transformer.TokenEmbedding(
        self.vocab_size, self.embedding_dim or self.hidden_size, name='embed')
    dropout = _dropout(self.dropout_rate, train)
    stack = functools.partial(
        RecurrentStack, cell=self.cell, hidden_size=self.hidden_size,
        num_layers=self.num_layers, dropout_rate=self.dropout_rate,
        unroll=self.unroll)
    memory = src_valid = None
    if 'src' in inputs:
      src_valid = inputs.get('src_valid')
      memory, _, carries = stack(name='encoder')(
          dropout(embed(inputs['src'])), train=train,
          lengths=_lengths(src_valid), return_carries=True)
    elif decode:
      carries = self.get_variable('cache', 'carries')
    else:
      raise ValueError("RNNSeq2Seq inputs need 'src' (only decode calls "
                       'after the first may leave it out)')
    ys, _, carries = stack(name='decoder')(
        dropout(embed(inputs['tgt'])), train=train,
        lengths=_lengths(inputs.get('tgt_valid')), initial_carries=carries,
        return_carries=True)
    if decode:
      self.put_variable('cache', 'carries', carries)
    if self.attention != 'none':
      context = attention_lib.Seq2SeqAttention(self.attention,
                                               name='attention')(
          ys, memory, memory_valid=src_valid, decode=decode)
      ys = jnp.tanh(axes.dense(
          self.hidden_size, ('rnn_in', 'rnn_hidden'), use_bias=False,
          name='attention_output')(jnp.concatenate([context, ys], -1)))
    return _token_logits(embed, dropout(ys), tie=self.tie_embeddings,
                         vocab_size=self.vocab_size)
