"""Convolutional classifiers: parameters shared over space."""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
from jax import lax
from jax.custom_batching import custom_vmap
import jax.numpy as jnp
import numpy as np

from bigjax.models import axes


def _windows_2x2(x):
  """[batch, H, W, C] -> [batch, H // 2, 2, W // 2, 2, C]: the 2x2 windows
  of stride 2 (an odd last row or column is dropped, as VALID pooling does)."""
  b, h, w, c = x.shape
  x = x[:, :h - h % 2, :w - w % 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c)


@jax.custom_vjp
def max_pool_2x2(x):
  """2x2 max-pooling with stride 2: [batch, H, W, C] -> [batch, H // 2,
  W // 2, C]; an odd last row or column is dropped, as `nn.max_pool` does.

  Written as a reshape and a max rather than `nn.max_pool`, whose gradient
  (`select_and_scatter_add`) is slow on XLA:CPU; that alone made the CNN's
  training step 1.5-2x faster (shared/PITFALLS.md). Its gradient is written
  out too: JAX's rule for `max` splits a window's gradient among tied
  maxima, which costs a count (a reduction over the full-size input) and a
  division; ours sends it to the first maximum in row-major order, as
  `nn.max_pool` and PyTorch do. The benchmark CNN's step went 70 -> 59 ms
  (one core, jaxlib 0.10.2). Ties are common: the zero background of an
  image gives equal pre-activations in a whole window.
  """
  return _windows_2x2(x).max(axis=(2, 4))


def _max_pool_2x2_forward(x):
  y = max_pool_2x2(x)
  return y, (x, y)


def _max_pool_2x2_backward(residuals, g):
  x, y = residuals
  windows = _windows_2x2(x)
  taken = jnp.zeros(y.shape, bool)  # Whether an earlier element was the max.
  rows = []
  for i in range(2):
    row = []
    for j in range(2):
      first = (windows[:, :, i, :, j] == y) & ~taken
      taken = taken | first
      row.append(jnp.where(first, g, 0))
    rows.append(jnp.stack(row, axis=3))
  b, h, w, c = y.shape
  dx = jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, c)
  # Dropped odd rows and columns get no gradient.
  return (jnp.pad(dx, ((0, 0), (0, x.shape[1] - dx.shape[1]),
                       (0, x.shape[2] - dx.shape[2]), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_2x2_forward, _max_pool_2x2_backward)


def avg_pool_2x2(x):
  """2x2 average-pooling with stride 2 over [batch, height, width, channels];
  an odd last row or column is dropped, as `nn.avg_pool` does. A reshape and
  a mean, whose gradient is a broadcast (`nn.avg_pool`'s is a padded
  reduce-window)."""
  return _windows_2x2(x).mean(axis=(2, 4))


POOLS = {'max': max_pool_2x2, 'avg': avg_pool_2x2}


def _one_call_per_kernel(fn):
  """`fn(x, kernel, ...)` whose vmap over batched kernels calls `fn` once per
  kernel (unrolled); with a shared kernel, the usual batching rule."""
  op = custom_vmap(fn)

  @op.def_vmap
  def rule(axis_size, in_batched, *args):
    if not in_batched[1]:
      return jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(
          *args), True
    args = [a if b else jnp.broadcast_to(a, (axis_size, *a.shape))
            for a, b in zip(args, in_batched)]
    outs = [fn(*[a[i] for a in args]) for i in range(axis_size)]
    out = jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
    return out, jax.tree.map(lambda _: True, out)
  return op


def _conv_transposes(conv_fn, x, kernel, g):
  """(dx, dkernel) of `conv_fn`'s output cotangent g: the convolution is
  linear in each argument, so each gradient is its transpose (unlike
  `jax.vjp`, no forward convolution is traced: FLOP counts stay exact)."""
  (dx,) = jax.linear_transpose(lambda x_: conv_fn(x_, kernel), x)(g)
  (dkernel,) = jax.linear_transpose(lambda k_: conv_fn(x, k_), kernel)(g)
  return dx, dkernel


# Convolutions with at most this many products per output element (window
# size x input channels) run forward as a sum of shifted inputs. XLA:CPU's
# convolution is an im2col and a matmul, and with 9 products per output it
# is all memory traffic: conv 3x3 1->32 on [128, 28, 28, 1] with bias and
# ReLU took 6.7 ms, the sum 0.9 ms; 5x5 1->32 11.2 against 3.6 ms; 3x3 3->32
# on 32x32 12.9 against 5.0 ms; but 3x3 8->32 9.6 against 18.8 ms (one core,
# jaxlib 0.10.2).
MAX_PRODUCTS_BY_TAPS = 32


def _channels_last(args, lhs_ndim):
  """Whether `lax.conv_general_dilated`'s static arguments (a dict) describe
  a plain channels-last convolution: [batch, *spatial, in] x [*window, in,
  out] -> [batch, *spatial, out], no dilation, no groups, no preferred
  type."""
  spatial = tuple(range(1, lhs_ndim - 1))
  plain = lax.ConvDimensionNumbers(
      lhs_spec=(0, lhs_ndim - 1, *spatial), out_spec=(0, lhs_ndim - 1, *spatial),
      rhs_spec=(lhs_ndim - 1, lhs_ndim - 2, *range(lhs_ndim - 2)))
  try:
    numbers = lax.conv_dimension_numbers(
        (1,) * lhs_ndim, (1,) * lhs_ndim, args.get('dimension_numbers'))
  except (TypeError, ValueError):
    return False
  return (numbers == plain
          and all(d == 1 for d in args.get('lhs_dilation') or ())
          and all(d == 1 for d in args.get('rhs_dilation') or ())
          and args.get('feature_group_count', 1) == 1
          and args.get('batch_group_count', 1) == 1
          and args.get('preferred_element_type') is None)


@functools.partial(jax.jit, static_argnames=('window_strides', 'padding'))
def conv_by_taps(x, kernel, window_strides, padding):
  """A channels-last convolution as a sum over the window's taps and the
  input channels of shifted, strided inputs times kernel rows: one fused
  elementwise loop on XLA:CPU. Accumulates in float32 at least.

  Args:
    x: [batch, *spatial, in].
    kernel: [*window, in, out].
    window_strides: one stride per spatial dimension.
    padding: per spatial dimension, (low, high).
  Returns:
    [batch, *out_spatial, out], of `x` and `kernel`'s result type.

  A jitted function of this name, so that `bigjax.flops` counts its
  products as a convolution's.
  """
  window = kernel.shape[:-2]
  x = lax.pad(x, jnp.zeros((), x.dtype),
              ((0, 0, 0), *((lo, hi, 0) for lo, hi in padding), (0, 0, 0)))
  out_spatial = [(n - k) // s + 1 for n, k, s
                 in zip(x.shape[1:-1], window, window_strides)]
  dtype = jnp.promote_types(jnp.result_type(x, kernel), jnp.float32)
  total = jnp.zeros((x.shape[0], *out_spatial, kernel.shape[-1]), dtype)
  for tap in np.ndindex(*window):
    shifted = lax.slice(
        x, (0, *tap, 0),
        (x.shape[0], *(t + (n - 1) * s + 1 for t, n, s
                       in zip(tap, out_spatial, window_strides)), x.shape[-1]),
        (1, *window_strides, 1))
    for c in range(x.shape[-1]):
      total = total + (shifted[..., c:c + 1].astype(dtype)
                       * kernel[tap + (c,)].astype(dtype))
  return total.astype(jnp.result_type(x, kernel))


def _forward_conv(static, conv_fn):
  """The forward convolution for `static`: `conv_by_taps` when it is plain,
  channels-last and has few products per output, else `conv_fn` (XLA's)."""
  args = dict(static)

  def forward(x, kernel):
    if (not _channels_last(args, x.ndim)
        or math.prod(kernel.shape[:-1]) > MAX_PRODUCTS_BY_TAPS):
      return conv_fn(x, kernel)
    padding = args['padding']
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(x.shape[1:-1], kernel.shape[:-2],
                                    args['window_strides'], padding)
    return conv_by_taps(x, kernel, tuple(args['window_strides']),
                        tuple(map(tuple, padding)))
  return forward


@functools.cache
def _conv_op(static):
  """The convolution for one set of static arguments, differentiable, with
  the vmap rule of `_one_call_per_kernel` for its forward and backward.
  The backward transposes XLA's convolution whatever the forward ran."""
  conv_fn = functools.partial(lax.conv_general_dilated, **dict(static))
  forward = _one_call_per_kernel(_forward_conv(static, conv_fn))
  backward = _one_call_per_kernel(functools.partial(_conv_transposes, conv_fn))

  @jax.custom_vjp
  def op(x, kernel):
    return forward(x, kernel)

  op.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)),
            lambda residuals, g: backward(*residuals, g))
  return op


def seedwise_conv_general_dilated(lhs, rhs, window_strides, padding, **kwargs):
  """`lax.conv_general_dilated`, but vmapped over seeds (kernels with a
  leading batch axis, `config.num_seeds`) it runs one convolution per seed.

  JAX batches a vmapped kernel into one grouped convolution, which XLA:CPU
  ran about 2x slower than the separate convolutions it replaces (conv
  3x3 32->64 on 14x14, batch 128, 8 seeds, forward and backward); this keeps
  each seed's convolution the one a lone run executes, bit for bit. Without
  vmap it is the plain convolution.
  """
  padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
  static = tuple(sorted(
      {'window_strides': tuple(window_strides), 'padding': padding,
       **{k: tuple(v) if isinstance(v, list) else v
          for k, v in kwargs.items()}}.items()))
  return _conv_op(static)(lhs, rhs)


def conv(features: int, kernel_size, **kwargs):
  """`nn.Conv` with kernel [kh, kw, in, out] named (., ., conv_in, conv_out),
  and a convolution that vmaps over seeds efficiently."""
  return nn.Conv(
      features, kernel_size,
      conv_general_dilated=seedwise_conv_general_dilated,
      kernel_init=axes.logical(nn.initializers.lecun_normal(),
                               (None, None, 'conv_in', 'conv_out')),
      bias_init=axes.logical(nn.initializers.zeros_init(), ('conv_out',)),
      **kwargs)


def batch_norm(**kwargs):
  """`nn.BatchNorm` over channels; its scale and offset are named conv_out.

  The running statistics are state, not parameters: they stay replicated.
  """
  return nn.BatchNorm(
      momentum=0.9,
      scale_init=axes.logical(nn.initializers.ones_init(), ('conv_out',)),
      bias_init=axes.logical(nn.initializers.zeros_init(), ('conv_out',)),
      **kwargs)


class CNN(nn.Module):
  """The seeds' CNN: [conv3x3 + ReLU + pool2] per entry of `features`, then
  dense(`dense_features`) + ReLU, then dense(`num_classes`).

  With the defaults this is conv3x3(32)-pool-conv3x3(64)-pool-dense(128)-
  dense(10). Dropout (rate `dropout_rate`) acts on the flattened features and
  on the hidden dense layer, only when `train=True`.

  Attributes:
    num_classes: size of the output logits.
    features: output channels of each conv block.
    kernel_size: spatial size of the square conv kernels ('SAME' padding).
    dense_features: width of the hidden dense layer.
    dropout_rate: dropout probability in [0, 1).
    pooling: 'max' or 'avg'.
  """
  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  kernel_size: int = 3
  dense_features: int = 128
  dropout_rate: float = 0.0
  pooling: str = 'max'

  @nn.compact
  def __call__(self, x, *, train: bool):
    """[batch, height, width, channels] float images -> [batch, num_classes]."""
    pool = POOLS[self.pooling]
    k = (self.kernel_size, self.kernel_size)
    for i, f in enumerate(self.features):
      x = conv(f, k, padding='SAME', name=f'conv{i}')(x)
      x = pool(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(axes.dense(self.dense_features, ('embed', 'mlp'),
                           name='hidden')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return axes.dense(self.num_classes, ('mlp', 'classes'), name='head')(x)


class ResidualBlock(nn.Module):
  """Pre-activation residual block (He et al. 2016, "Identity mappings").

  x -> [BN -> ReLU -> conv3x3(stride)] -> [BN -> ReLU -> conv3x3] + shortcut,
  where the shortcut is a 1x1 conv when the shape changes, else identity.
  Without BatchNorm the norms are skipped.

  Attributes:
    features: output channels.
    strides: spatial stride of the first conv (2 halves height and width).
    batch_norm: use BatchNorm (statistics in the 'batch_stats' collection).
  """
  features: int
  strides: int = 1
  batch_norm: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool):
    """[batch, H, W, C] -> [batch, H / strides, W / strides, features]."""
    norm = (functools.partial(batch_norm, use_running_average=not train)
            if self.batch_norm else None)

    def preact(y, name):
      return nn.relu(norm(name=name)(y) if norm else y)

    y = preact(x, 'norm0')
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      # Project from the pre-activated input, as in the pre-act ResNet.
      shortcut = conv(self.features, (1, 1), strides=self.strides,
                         use_bias=False, name='shortcut')(y)
    y = conv(self.features, (3, 3), strides=self.strides, padding='SAME',
             use_bias=not norm, name='conv0')(y)
    y = preact(y, 'norm1')
    y = conv(self.features, (3, 3), padding='SAME', use_bias=not norm,
             name='conv1')(y)
    return y + shortcut


class ResNet(nn.Module):
  """A small pre-activation ResNet for small images.

  conv3x3(stage_features[0]) stem, then `blocks_per_stage` residual blocks
  per stage (the first block of every stage after the first halves the
  resolution), a final norm + ReLU, global average pooling and a dense head.
  The defaults (3 stages of 2 blocks, 16/32/64 channels) are ResNet-14-like,
  about 0.17M parameters.

  Attributes:
    num_classes: size of the output logits.
    stage_features: channels of each stage.
    blocks_per_stage: residual blocks per stage.
    batch_norm: BatchNorm in every block (its running statistics live in the
      train state's model_state['batch_stats']).
    dropout_rate: dropout before the head.
  """
  num_classes: int = 10
  stage_features: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 2
  batch_norm: bool = True
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool):
    """[batch, H, W, C] images -> [batch, num_classes] logits."""
    x = conv(self.stage_features[0], (3, 3), padding='SAME', name='stem')(x)
    for stage, features in enumerate(self.stage_features):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(features, strides, self.batch_norm,
                          name=f'stage{stage}_block{block}')(x, train=train)
    if self.batch_norm:
      x = batch_norm(use_running_average=not train, name='final_norm')(x)
    x = nn.relu(x).mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return axes.dense(self.num_classes, ('embed', 'classes'), name='head')(x)
