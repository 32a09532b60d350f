"""Per-example losses and parameter penalties, found by name.

Each loss maps logits [batch, num_classes] and integer labels [batch] to
per-example losses [batch]; the train step takes their masked mean.
"""

import functools

import jax
import jax.numpy as jnp
import optax


def cross_entropy(logits, labels, *, label_smoothing=0.0):
  """Softmax cross-entropy against (optionally smoothed) one-hot labels."""
  num_classes = logits.shape[-1]
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, num_classes), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def mse(logits, labels, *, label_smoothing=0.0):
  """Squared error between the logits and one-hot targets, summed over classes.

  The logits are regressed directly (no softmax), as in Hui & Belkin (2021),
  "Evaluation of neural architectures trained with square loss vs
  cross-entropy in classification tasks".
  """
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.sum(jnp.square(logits - targets), axis=-1)


LOSSES = {'cross_entropy': cross_entropy, 'mse': mse}


def make_loss(loss_config):
  """The per-example loss `(logits, labels) -> [batch]` that config names."""
  return functools.partial(
      LOSSES[loss_config.name], label_smoothing=loss_config.label_smoothing)


def is_penalised(path) -> bool:
  """Weights that L1/L2 and weight decay act on: kernels and embeddings.

  Biases, norm scales and offsets are left alone, as is standard practice.
  """
  name = path[-1].key if hasattr(path[-1], 'key') else str(path[-1])
  return name in ('kernel', 'embedding')


def penalty_mask(params):
  """A pytree of bools shaped like params: True where `is_penalised`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_penalised(path), params)


def weight_penalty(params, *, l1: float, l2: float):
  """l1 * sum|w| + l2 / 2 * sum w^2 over the penalised weights (a scalar)."""
  total = jnp.zeros((), jnp.float32)
  for path, w in jax.tree_util.tree_leaves_with_path(params):
    if is_penalised(path):
      w = w.astype(jnp.float32)
      total += l1 * jnp.sum(jnp.abs(w)) + 0.5 * l2 * jnp.sum(jnp.square(w))
  return total
