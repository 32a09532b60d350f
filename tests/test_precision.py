"""Mixed precision (`config.precision`, bigjax/precision.py): every matmul and
convolution of every default model runs in bfloat16, forward and backward,
while parameters, optimizer state and the loss stay float32; and the default
models train under it as they do in float32."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import settings
from bigjax import config_files
from bigjax import precision
from bigjax import train
from bigjax.errors import UserError
from tests.conftest import ROOT

# The default config of each model family (the seq2seq task generates its
# own data; the others have theirs described, `benchmarks.settings`).
CONFIGS = ('cnn_fashion_mnist', 'lstm_fashion_mnist', 'gru_fashion_mnist',
           'vit_fashion_mnist', 'transformer_shakespeare', 'lstm_shakespeare',
           'transformer_seq2seq')
# Variants whose extra paths (sinusoidal codes, other kernels) must not leak
# float32 into the matmuls either.
VARIANTS = {
    'transformer_shakespeare': [{'model.positional': 'sinusoidal'},
                                {'model.attention_kernel': 'chunked'},
                                {'model.cross_layer_sharing': 'all',
                                 'model.step_encoding': True}],
    'vit_fashion_mnist': [{'model.positional': 'sinusoidal'}],
}

_MATMULS = ('dot_general', 'conv_general_dilated')


def _experiment(name, compute_dtype, batch_size, constant_lr=False,
                overrides=None):
  config = config_files.load_config(f'{ROOT}/configs/{name}.py')
  config.update_from_flattened_dict(overrides or {})
  config.precision.compute_dtype = compute_dtype
  config.batch_size = batch_size
  if constant_lr:  # The peak rate from the first step.
    config.optimizer.schedule = 'constant'
    config.optimizer.warmup_steps = 0
  if config.task == 'seq2seq':
    exp = train.build_experiment(config)
    batch = next(exp.task.train_batches(global_batch_size=batch_size,
                                        seed=0, start_step=0))
  else:
    exp = settings.synthetic_experiment(config)
    batch = settings.synthetic_batch(config)
  return exp, jax.tree.map(jnp.asarray, batch)


def _matmul_operand_dtypes(jaxpr) -> set:
  """{(primitive, operand dtypes)} of every matmul and convolution in
  `jaxpr`, sub-jaxprs (scan, remat, custom VJPs, pjit) included.

  The LayerNorm's `weighted_row_sum`s are left out: its statistics and
  scale-weighted row sums, written as products with a vector
  (bigjax/models/layer_norm.py), kept in float32 as flax keeps them.
  """
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.params.get('name') == 'weighted_row_sum':
      continue
    if eqn.primitive.name in _MATMULS:
      found.add((eqn.primitive.name,
                 tuple(str(v.aval.dtype) for v in eqn.invars)))
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found |= _matmul_operand_dtypes(sub)
  return found


def _float_dtypes(tree) -> set:
  """The dtype names of `tree`'s floating-point leaves."""
  return {str(x.dtype) for x in jax.tree.leaves(tree)
          if jnp.issubdtype(x.dtype, jnp.floating)}


@pytest.mark.parametrize('name, overrides', [(n, None) for n in CONFIGS] + [
    (n, o) for n, variants in VARIANTS.items() for o in variants])
def test_bfloat16_policy_runs_every_matmul_in_bfloat16(name, overrides):
  exp, batch = _experiment(name, 'bfloat16', batch_size=4,
                           overrides=overrides)
  state = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  closed = jax.make_jaxpr(exp.train_step)(state, batch)
  dtypes = _matmul_operand_dtypes(closed.jaxpr)
  assert dtypes, 'no matmul traced'
  leaks = {d for d in dtypes if set(d[1]) != {'bfloat16'}}
  assert not leaks, f'matmuls not in bfloat16: {sorted(leaks)}'
  # The stored state and the loss stay float32.
  new_state, metrics = jax.eval_shape(exp.train_step, state, batch)
  for tree in (new_state.params, new_state.opt_state):
    assert _float_dtypes(tree) == {'float32'}
  assert metrics['train/loss'].dtype == jnp.float32


def test_float32_policy_has_no_bfloat16():
  exp, batch = _experiment('transformer_shakespeare', 'float32', batch_size=4)
  state = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  dtypes = _matmul_operand_dtypes(
      jax.make_jaxpr(exp.train_step)(state, batch).jaxpr)
  assert {t for _, ts in dtypes for t in ts} == {'float32'}


def _losses(exp, batch, steps):
  """Training losses of `steps` steps on one fixed batch, from seed 0."""
  step = jax.jit(exp.train_step)
  state = jax.jit(exp.init_state)(jax.random.PRNGKey(0))
  out = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    out.append(float(metrics['train/loss']))
  return np.array(out)


# Fitting one batch of 8 for 15 steps: the loss must fall, and its curve stay
# close to float32's. bfloat16 keeps 8 bits of mantissa, so the curves differ
# by a few percent, not by orders.
@pytest.mark.parametrize('name', ['cnn_fashion_mnist', 'lstm_fashion_mnist',
                                  'vit_fashion_mnist',
                                  'transformer_shakespeare'])
def test_default_configs_train_stably_in_bfloat16(name):
  steps = 15
  curves = {}
  for dtype in ('float32', 'bfloat16'):
    exp, batch = _experiment(name, dtype, batch_size=8, constant_lr=True)
    curves[dtype] = _losses(exp, batch, steps)
  f32, bf16 = curves['float32'], curves['bfloat16']
  assert np.all(np.isfinite(bf16))
  assert bf16[-5:].mean() < 0.7 * bf16[0], bf16
  # Same start (same float32 weights, rounded), same trajectory within 10%
  # of the float32 loss's fall.
  fall = f32[0] - f32[-5:].mean()
  np.testing.assert_allclose(bf16, f32, atol=0.1 * fall + 0.02 * f32[0])


def test_policy_casts_floating_leaves_only():
  policy = precision.Policy(compute_dtype=jnp.bfloat16)
  tree = {'w': jnp.ones(3), 'ids': jnp.arange(3), 'ok': jnp.ones(2, bool)}
  cast = policy.cast_to_compute(tree)
  assert cast['w'].dtype == jnp.bfloat16
  assert cast['ids'].dtype == tree['ids'].dtype
  assert cast['ok'].dtype == jnp.bool_
  assert policy.cast_to_output(cast['w']).dtype == jnp.float32


def test_unknown_dtype_is_a_one_line_error():
  config = config_files.load_config(f'{ROOT}/configs/cnn_fashion_mnist.py')
  config.precision.compute_dtype = 'float16'
  with pytest.raises(UserError, match=r"config.precision.compute_dtype='float16' "
                     r"is not one of 'bfloat16', 'float32'"):
    settings.synthetic_experiment(config)


def test_bfloat16_parameters_are_stored_and_updated_in_bfloat16():
  config = config_files.load_config(f'{ROOT}/configs/cnn_fashion_mnist.py')
  config.precision.param_dtype = 'bfloat16'
  exp = settings.synthetic_experiment(config)
  state = jax.eval_shape(exp.init_state, jax.random.PRNGKey(0))
  batch = jax.tree.map(jnp.asarray, settings.synthetic_batch(config))
  new_state, _ = jax.eval_shape(exp.train_step, state, batch)
  for tree in (state.params, new_state.params, new_state.opt_state):
    assert _float_dtypes(tree) == {'bfloat16'}
