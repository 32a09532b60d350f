"""The benchmark suite (`benchmarks.run`) in a tiny mode, its FLOP formulas,
and (where torch is installed) its PyTorch references."""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from benchmarks import model_flops
from benchmarks import settings
from tests.conftest import ROOT


@pytest.fixture(scope='module')
def cnn_record(tmp_path_factory):
  """The record of a 2-step CNN run of the real command, without torch."""
  path = tmp_path_factory.mktemp('bench') / 'run.json'
  done = subprocess.run(
      [sys.executable, '-m', 'benchmarks.run', '--models=cnn', '--steps=2',
       '--warmup=1', '--round_steps=1', '--torch=false', '--matmul_size=256',
       f'--json={path}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert '| cnn | 421,642 | 128 |' in done.stdout
  with open(path) as f:
    records = json.load(f)
  assert len(records) == 1
  return records[0]


def test_suite_record_has_its_fields(cnn_record):
  r = cnn_record
  for key in ('parameters', 'analytic_flops', 'jaxpr_flops', 'xla_flops',
              'achieved_flops_per_s', 'mfu', 'compile_s', 'xla_memory_bytes',
              'jax_rss_peak_bytes', 'peak_flops_per_s', 'device', 'threads'):
    assert key in r, key
  assert r['jax']['steps'] == 2 and len(r['jax']['step_seconds']) == 2
  assert 0 < r['jax']['q1_s'] <= r['jax']['median_s'] <= r['jax']['q3_s']
  assert r['jax']['items_per_s'] == pytest.approx(128 / r['jax']['median_s'])
  assert 'torch' not in r and 'jax_vs_torch' not in r
  assert r['compile_s'] > 0 and r['peak_flops_per_s'] > 0 and r['mfu'] > 0
  # At least the parameters and Adam's two moments.
  assert r['xla_memory_bytes']['total'] > 3 * 421_642 * 4


def test_cnn_flops_analytic_traced_and_xla_agree(cnn_record):
  r = cnn_record
  # 2 * MACs: conv0 (no data gradient) 2x, conv1 and the denses 3x forward.
  forward = 2 * 128 * (28 * 28 * 9 * 32 + 14 * 14 * 9 * 32 * 64
                       + 3136 * 128 + 128 * 10)
  conv0 = 2 * 128 * 28 * 28 * 9 * 32
  assert r['analytic_flops'] == 3 * forward - conv0
  # The traced step holds them and dead code XLA drops (module doc of
  # benchmarks.model_flops): conv0's data gradient, and the forward
  # convolutions that the custom_vjp's backward recomputes for its vjp.
  assert 1.0 <= r['jaxpr_flops'] / r['analytic_flops'] < 1.4
  # XLA's count of the optimised step has no dead code and no loop (which
  # it would count once). It skips multiply-adds on SAME padding (of conv1's
  # 14x14 outputs' taps 9% fall on padding, of conv0's 5%) and adds the
  # elementwise work (ReLU, pooling, dropout, loss, Adam), a few percent
  # each way. Measured: 0.95.
  assert 0.85 < r['xla_flops'] / r['analytic_flops'] < 1.1


@pytest.mark.parametrize('name', ['lstm', 'transformer_lm', 'vit'])
def test_analytic_flops_match_the_traced_step(name):
  """The formulas against the matmuls JAX traces (loops multiplied out).

  They count full attention, as MFU conventionally does; the benchmark GPT's
  'blocked' kernel skips the keys the causal mask hides (and recomputes its
  softmax in the backward pass), so the formulas are checked against the
  plain kernel's step."""
  config = settings.load_config(name)
  if config.model.get('attention_kernel') == 'blocked':
    config.model.attention_kernel = 'einsum'
  exp = settings.synthetic_experiment(config)
  analytic = model_flops.train_flops(
      exp.model, batch_size=config.batch_size,
      image_shape=settings.IMAGE_SHAPE, seq_len=config.data.seq_len)
  init, step = exp.init_state, exp.train_step
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                       settings.synthetic_batch(config))
  traced = model_flops.jaxpr_flops(
      step, jax.eval_shape(init, jax.random.PRNGKey(0)), batch)
  # JAX also computes data gradients the formulas leave out as unneeded
  # (the LSTM's input rows: 28 of its 156 rows, in the backward pass).
  assert 1.0 <= traced / analytic < {'lstm': 1.07}.get(name, 1.001)


@pytest.mark.parametrize('name', ['cnn', 'lstm', 'transformer_lm'])
def test_torch_reference_computes_our_logits(name):
  """Given our parameters, the PyTorch reference computes our logits: the
  same network (and the same trainable parameter count)."""
  pytest.importorskip('torch')
  from benchmarks import torch_models
  config = settings.load_config(name)
  exp = settings.synthetic_experiment(config)
  batch = {k: v[:3] for k, v in settings.synthetic_batch(config).items()}
  inputs = exp.task.model_inputs(batch)
  params = nn.unbox(jax.jit(functools.partial(exp.model.init, train=False))(
      jax.random.PRNGKey(0), inputs))['params']
  ours = jax.jit(functools.partial(exp.model.apply, train=False))(
      {'params': params}, inputs)
  reference = torch_models.build(exp.model, image_shape=settings.IMAGE_SHAPE,
                                 seq_len=config.data.seq_len)
  assert torch_models.parameter_count(reference) == sum(
      x.size for x in jax.tree.leaves(params))
  torch_models.load_flax_params(reference, jax.tree.map(np.asarray, params))
  got = reference.eval()(torch_models.inputs(exp.model, batch)['inputs'])
  np.testing.assert_allclose(got.detach().numpy(), ours, atol=1e-4,
                             rtol=1e-3)
