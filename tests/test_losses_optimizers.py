"""Losses, penalties, schedules and optimisers against hand-computed values."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigjax import losses
from bigjax import optimizers
from configs import base

LOGITS = np.array([[2.0, 0.5, -1.0], [0.0, 0.0, 3.0]], np.float32)
LABELS = np.array([0, 1])


def test_cross_entropy_matches_numpy():
  log_probs = LOGITS - np.log(np.exp(LOGITS).sum(-1, keepdims=True))
  want = -log_probs[np.arange(2), LABELS]
  got = losses.cross_entropy(LOGITS, LABELS)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  # Smoothing 0.3 over 3 classes: targets 0.8 / 0.1 / 0.1.
  targets = np.full((2, 3), 0.1)
  targets[np.arange(2), LABELS] = 0.8
  np.testing.assert_allclose(
      losses.cross_entropy(LOGITS, LABELS, label_smoothing=0.3),
      -(targets * log_probs).sum(-1), rtol=1e-6)


def test_mse_regresses_logits_on_one_hot():
  # Row 0: (2-1)^2 + 0.5^2 + 1^2 = 2.25; row 1: 0 + 1 + 9 = 10.
  np.testing.assert_allclose(losses.mse(LOGITS, LABELS), [2.25, 10.0])


def test_weight_penalty_counts_kernels_not_biases():
  params = {'dense': {'kernel': jnp.array([[1.0, -2.0]]), 'bias': jnp.array([5.0])},
            'embed': {'embedding': jnp.array([[3.0]])}}
  # L1 over kernel and embedding: 1 + 2 + 3 = 6; L2: (1 + 4 + 9) / 2 = 7.
  got = losses.weight_penalty(params, l1=0.1, l2=0.01)
  np.testing.assert_allclose(got, 0.1 * 6 + 0.01 * 7, rtol=1e-6)
  mask = losses.penalty_mask(params)
  assert mask == {'dense': {'kernel': True, 'bias': False},
                  'embed': {'embedding': True}}


def _optimizer_config(**overrides):
  opt = base.get_config().optimizer
  opt.update(overrides)
  return opt


def test_warmup_cosine_schedule_values():
  opt = _optimizer_config(learning_rate=1.0, warmup_steps=10,
                          final_lr_fraction=0.1)
  schedule = optimizers.make_schedule(opt, total_steps=110)
  np.testing.assert_allclose(
      [schedule(0), schedule(5), schedule(10), schedule(60), schedule(110)],
      [0.0, 0.5, 1.0, 0.1 + 0.9 * 0.5, 0.1], rtol=1e-5, atol=1e-7)
  constant = optimizers.make_schedule(_optimizer_config(schedule='constant'), 5)
  assert constant(3) == pytest.approx(1e-3)


def _one_update(opt, grads, params):
  tx = optimizers.make_optimizer(opt, optimizers.make_schedule(opt, 100))
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  updates, _ = tx.update(grads, state, optax.apply_updates(params, updates))
  return updates


def test_sgd_momentum_second_step():
  opt = _optimizer_config(name='sgd', learning_rate=0.1, momentum=0.9,
                          schedule='constant')
  params = {'kernel': jnp.ones(2)}
  grads = {'kernel': jnp.array([1.0, -2.0])}
  # Heavy-ball momentum: the second update is -lr * (g + 0.9 g).
  np.testing.assert_allclose(_one_update(opt, grads, params)['kernel'],
                             -0.1 * 1.9 * grads['kernel'], rtol=1e-6)


def test_adamw_decays_kernels_only():
  opt = _optimizer_config(name='adamw', learning_rate=0.1, weight_decay=0.5,
                          schedule='constant')
  params = {'kernel': jnp.full(2, 2.0), 'bias': jnp.full(2, 2.0)}
  zero = jax.tree.map(jnp.zeros_like, params)
  tx = optimizers.make_optimizer(opt, optimizers.make_schedule(opt, 10))
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only decoupled decay moves the kernel, by -lr * wd * w.
  np.testing.assert_allclose(updates['kernel'], -0.1 * 0.5 * 2.0, rtol=1e-6)
  np.testing.assert_allclose(updates['bias'], 0.0)


def test_grad_clipping_bounds_the_update():
  opt = _optimizer_config(name='sgd', learning_rate=1.0, momentum=0.0,
                          schedule='constant', grad_clip_norm=1.0)
  tx = optimizers.make_optimizer(opt, optimizers.make_schedule(opt, 10))
  params = {'kernel': jnp.zeros(2)}
  updates, _ = tx.update({'kernel': jnp.array([3.0, 4.0])}, tx.init(params),
                         params)
  np.testing.assert_allclose(updates['kernel'], [-0.6, -0.8], rtol=1e-6)


def _grouped(frozen=(), lr_multipliers=(), name='adamw'):
  opt = base.get_config().optimizer
  opt.name, opt.learning_rate, opt.schedule = name, 0.1, 'constant'
  opt.frozen, opt.lr_multipliers = frozen, lr_multipliers
  return optimizers.make_optimizer(opt, optimizers.make_schedule(opt, 10))


def test_parameter_groups_freeze_and_scale():
  params = {'encoder': {'kernel': jnp.ones((2, 2))},
            'head': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'other': {'kernel': jnp.ones((2, 2))}}
  grads = jax.tree.map(lambda p: 0.3 * p, params)
  tx = _grouped(frozen=('encoder/.*',), lr_multipliers=(('head/.*', 0.25),))
  updates, _ = tx.update(grads, tx.init(params), params)
  plain = _grouped()
  want, _ = plain.update(grads, plain.init(params), params)
  np.testing.assert_array_equal(updates['encoder']['kernel'], 0.0)
  np.testing.assert_allclose(updates['head']['kernel'],
                             0.25 * want['head']['kernel'], rtol=1e-6)
  np.testing.assert_allclose(updates['head']['bias'],
                             0.25 * want['head']['bias'], rtol=1e-6)
  np.testing.assert_array_equal(updates['other']['kernel'],
                                want['other']['kernel'])
  assert np.all(np.asarray(want['encoder']['kernel']) != 0)


@pytest.mark.parametrize('frozen, multipliers, message', [
    (('encodr/.*',), (), "pattern 'encodr/.*' matches no parameter"),
    (('(',), (), "pattern '(' is not a regular expression"),
    ((), (('head/.*', -1.0),), 'is not a (regex, factor >= 0) pair'),
])
def test_parameter_group_patterns_are_checked(frozen, multipliers, message):
  from bigjax.errors import UserError
  opt = base.get_config().optimizer
  opt.frozen, opt.lr_multipliers = frozen, multipliers
  with pytest.raises(UserError) as e:
    optimizers.check_groups(opt, ['encoder/kernel', 'head/kernel'])
  assert message in str(e.value) and '\n' not in str(e.value)
