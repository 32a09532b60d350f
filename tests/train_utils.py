"""Helpers several test files share."""

import jax
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
