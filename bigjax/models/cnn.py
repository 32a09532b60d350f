"""Convolutional classifiers: parameters shared over space."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


def max_pool_2x2(x):
  """2x2 max-pooling with stride 2 over [batch, height, width, channels].

  Written as a reshape and a max rather than `nn.max_pool`: on XLA:CPU the
  gradient of `reduce_window` is slow and this made the whole CNN training
  step 1.5-2x faster (see shared/PITFALLS.md). Odd sizes fall back to
  `nn.max_pool`, which drops the last row/column just as this would.
  """
  b, h, w, c = x.shape
  if h % 2 or w % 2:
    return nn.max_pool(x, (2, 2), strides=(2, 2))
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def avg_pool_2x2(x):
  """2x2 average-pooling with stride 2 over [batch, height, width, channels]."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2))


POOLS = {'max': max_pool_2x2, 'avg': avg_pool_2x2}


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
      x = nn.Conv(f, k, padding='SAME', name=f'conv{i}')(x)
      x = pool(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.relu(nn.Dense(self.dense_features, name='hidden')(x))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name='head')(x)
