"""Helpers several test files share."""

import jax
import numpy as np
import optax


def adam_losses(model, params, images, labels, *, steps: int, lr=1e-2):
  """Losses of `steps` Adam steps of softmax cross-entropy on one batch.

  A quick check that a classifier's gradients reach its parameters: on a
  fixed batch the loss must fall.
  """
  tx = optax.adam(lr)

  @jax.jit
  def step(params, opt_state, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, images, train=True,
                           rngs={'dropout': rng})
      return optax.softmax_cross_entropy_with_integer_labels(
          logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state, losses = tx.init(params), []
  for i in range(steps):
    params, opt_state, loss = step(params, opt_state, jax.random.PRNGKey(i))
    losses.append(float(loss))
  return losses


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(got, want):
  """Two lists of batches (dicts of arrays) are equal, key by key."""
  assert len(got) == len(want)
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    for k in g:
      np.testing.assert_array_equal(g[k], w[k], err_msg=k)


def simulate_processes(monkeypatch, count, index):
  """Makes this process look like process `index` of `count`."""
  monkeypatch.setattr(jax, 'process_count', lambda: count)
  monkeypatch.setattr(jax, 'process_index', lambda: index)
