"""Attention against NumPy and Flax, kernels against each other, masks, RoPE."""

import functools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import test_util

from bigjax.models import attention
from bigjax.models import positional

B, Q, K, D = 2, 5, 7, 8

# Jitted once per static setting: eager dispatch of the kernels' many small
# ops would dominate the test time.
_attention = jax.jit(attention.dot_product_attention, static_argnames=(
    'is_causal', 'kernel', 'chunk_size', 'return_weights', 'block_queries',
    'block_logits'))


def _qkv(heads, kv_heads, q_len=Q, kv_len=K, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(B, q_len, heads, D)).astype(np.float32)
  k = rng.normal(size=(B, kv_len, kv_heads, D)).astype(np.float32)
  v = rng.normal(size=(B, kv_len, kv_heads, D)).astype(np.float32)
  return q, k, v


def numpy_attention(q, k, v, mask=None):
  """softmax(QK^T / sqrt(d)) V per head, key/value heads repeated for GQA."""
  heads, kv_heads = q.shape[2], k.shape[2]
  k = np.repeat(k, heads // kv_heads, axis=2)
  v = np.repeat(v, heads // kv_heads, axis=2)
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  logits = logits - logits.max(-1, keepdims=True)
  w = np.exp(logits)
  w = w / w.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', w, v), w


# kv_valid leaves 5 and 7 keys; q_valid pads the last query of example 0.
KV_VALID = np.array([[1, 1, 1, 1, 1, 0, 0], [1] * 7], bool)
Q_VALID = np.array([[1, 1, 1, 1, 0], [1] * 5], bool)


def test_einsum_matches_numpy_with_gqa_and_masks():
  q, k, v = _qkv(heads=4, kv_heads=2)
  mask = np.asarray(attention.causal_mask(Q, K)) & KV_VALID[:, None, None, :]
  out, w = _attention(q, k, v, mask=mask, return_weights=True)
  ref_out, ref_w = numpy_attention(q, k, v, mask)
  np.testing.assert_allclose(out, ref_out, atol=1e-5)
  np.testing.assert_allclose(w, ref_w, atol=1e-6)
  # Query 0 sees keys 0..2 (offset kv_len - q_len = 2), so key 3 gets 0.
  assert np.all(np.asarray(w)[:, :, 0, 3:] == 0)
  assert np.all(np.asarray(w)[:, :, 0, :3] > 0)


def test_masks_have_the_documented_pattern():
  np.testing.assert_array_equal(
      attention.causal_mask(2, 4)[0, 0],
      [[True, True, True, False], [True, True, True, True]])
  pad = attention.padding_mask(Q_VALID, KV_VALID)
  assert pad.shape == (B, 1, Q, K)
  assert int(pad.sum()) == 4 * 5 + 5 * 7
  combined = attention.combine_masks(None, attention.causal_mask(Q, K), pad)
  assert int(combined.sum()) == int(
      (np.asarray(attention.causal_mask(Q, K)) & np.asarray(pad)).sum())
  assert attention.combine_masks(None, None) is None


MASK_CASES = {
    'none': {},
    'causal': {'is_causal': True},
    'padding': {'q_valid': Q_VALID, 'kv_valid': KV_VALID},
    'causal+padding': {'is_causal': True, 'q_valid': Q_VALID,
                       'kv_valid': KV_VALID},
    'dense': {'mask': np.random.default_rng(3).random((B, 4, Q, K)) > 0.3},
    'dense per batch, structured causal': {
        'mask': attention.padding_mask(None, KV_VALID), 'is_causal': True},
}


# Each mask case with one head layout; together they cover MHA (4/4), GQA
# (4/2) and MQA (4/1) with and without masks.
@pytest.mark.parametrize('case, kv_heads', [
    ('none', 4), ('causal', 2), ('padding', 1), ('causal+padding', 2),
    ('causal+padding', 1), ('dense', 2),
    ('dense per batch, structured causal', 4)])
def test_xla_and_chunked_kernels_equal_einsum(case, kv_heads):
  heads = 4
  q, k, v = _qkv(heads, kv_heads)
  kwargs = MASK_CASES[case]
  expected = _attention(q, k, v, **kwargs)
  # The structured masks equal their dense forms.
  dense = attention.combine_masks(
      kwargs.get('mask'),
      attention.causal_mask(Q, K) if kwargs.get('is_causal') else None,
      attention.padding_mask(kwargs['q_valid'], kwargs['kv_valid'])
      if 'q_valid' in kwargs else None)
  with np.errstate(invalid='ignore'):
    ref = numpy_attention(q, k, v, None if dense is None
                          else np.asarray(dense))[0]
  ref = np.nan_to_num(ref)  # NumPy's fully masked rows are NaN; ours zero.
  np.testing.assert_allclose(expected, ref, atol=1e-5)
  # Chunks of 3 split the 7 keys unevenly (the last is padded); 16 is one.
  chunk_sizes = (3, 16) if case == 'causal+padding' else (3,)
  # Blocks of 2 queries and one example (a lax.map over the batch), and of
  # 3 queries and the whole batch.
  blocked = (('blocked', {'block_queries': 2, 'block_logits': 1}),
             ('blocked', {'block_queries': 3, 'block_logits': 10 ** 6}))
  for kernel, extra in (('xla', {}),) + tuple(
      ('chunked', {'chunk_size': c}) for c in chunk_sizes) + blocked:
    got = _attention(q, k, v, kernel=kernel, **extra, **kwargs)
    np.testing.assert_allclose(got, expected, atol=1e-5,
                               err_msg=f'{kernel} {extra}')
  # The chunked kernel's own VJP gives the einsum kernel's gradients.
  probe = np.random.default_rng(4).normal(size=expected.shape)

  def grads(kernel, **extra):
    return jax.grad(lambda q, k, v: jnp.sum(probe * attention.dot_product_attention(
        q, k, v, kernel=kernel, **extra, **kwargs)), argnums=(0, 1, 2))(
            q, k, v)

  want = grads('einsum')
  for kernel, extra in (('chunked', {'chunk_size': 3}),) + blocked:
    for got, expected, name in zip(grads(kernel, **extra), want, 'qkv'):
      np.testing.assert_allclose(got, expected, atol=1e-5,
                                 err_msg=f'd{name} {kernel} {extra}')


@pytest.mark.parametrize('q_len, kv_len', [(7, 5), (5, 7), (6, 6)])
def test_blocked_kernel_skips_only_hidden_keys(q_len, kv_len):
  """Under a causal mask each block of queries reads a prefix of the keys;
  with more queries than keys the first blocks see none and output zeros."""
  q, k, v = _qkv(4, 2, q_len=q_len, kv_len=kv_len)
  want = attention.dot_product_attention(q, k, v, is_causal=True)
  for block_queries in (1, 2, 4, 64):
    got = attention.dot_product_attention(
        q, k, v, is_causal=True, kernel='blocked',
        block_queries=block_queries, block_logits=1)
    np.testing.assert_allclose(got, want, atol=1e-5,
                               err_msg=f'{block_queries} queries per block')
  if q_len > kv_len:
    assert np.all(np.asarray(want)[:, :q_len - kv_len] == 0)


@pytest.mark.parametrize('kernel', ['einsum', 'xla', 'chunked', 'blocked'])
def test_fully_masked_rows_are_zero_and_have_finite_gradients(kernel):
  q, k, v = _qkv(heads=2, kv_heads=2)
  kv_valid = KV_VALID.copy()
  kv_valid[0] = False  # Example 0 sees no key at all.

  @jax.jit
  def f(q, k, v):
    return attention.dot_product_attention(
        q, k, v, kv_valid=kv_valid, kernel=kernel, chunk_size=3)

  out = f(q, k, v)
  assert np.all(np.asarray(out)[0] == 0)
  assert np.all(np.abs(np.asarray(out)[1]) > 0)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2),
                           argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize('kernel', ['einsum', 'chunked', 'blocked'])
def test_gradients_match_finite_differences(kernel):
  q, k, v = (x.astype(np.float64) for x in _qkv(2, 1, q_len=3, kv_len=4))
  with jax.enable_x64(True):
    test_util.check_grads(
        jax.jit(lambda q, k, v: attention.dot_product_attention(
            q, k, v, is_causal=True, kernel=kernel, chunk_size=3)),
        (q, k, v), order=1, modes=['rev'], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize('kernel', ['einsum', 'chunked', 'blocked'])
@pytest.mark.parametrize('batch_positions', [False, True])
def test_rope_argument_equals_rotating_first(kernel, batch_positions):
  """rope=(q_positions, kv_positions) is apply_rope on q and k, then
  attention: values and gradients (the blocked kernel rotates inside its
  pieces and turns the gradients back itself), with per-example positions
  and a padding mask too."""
  q, k, v = _qkv(4, 2)
  q_pos, kv_pos = np.arange(Q) + 3, np.arange(K)
  if batch_positions:  # [batch, length]: rows start at different offsets.
    q_pos = np.stack([q_pos, q_pos + 5])
    kv_pos = np.stack([kv_pos, kv_pos + 2])
  kwargs = dict(is_causal=True, kv_valid=KV_VALID, chunk_size=3,
                block_queries=2, block_logits=1)
  probe = np.random.default_rng(5).normal(size=q.shape)

  def loss(q, k, v, fused):
    if fused:
      out = attention.dot_product_attention(q, k, v, kernel=kernel,
                                            rope=(q_pos, kv_pos), **kwargs)
    else:
      out = attention.dot_product_attention(
          positional.apply_rope(q, q_pos), positional.apply_rope(k, kv_pos),
          v, kernel='einsum', **kwargs)
    return jnp.sum(probe * out)

  np.testing.assert_allclose(loss(q, k, v, True), loss(q, k, v, False),
                             rtol=1e-5)
  got = jax.grad(functools.partial(loss, fused=True), (0, 1, 2))(q, k, v)
  want = jax.grad(functools.partial(loss, fused=False), (0, 1, 2))(q, k, v)
  for g, w, name in zip(got, want, 'qkv'):
    np.testing.assert_allclose(g, w, atol=2e-5, err_msg=f'd{name}')
  # Traced positions (decoding's) take the same path.
  traced = jax.jit(lambda q, k, v, qp, kp: attention.dot_product_attention(
      q, k, v, kernel=kernel, rope=(qp, kp), **kwargs))(q, k, v, q_pos,
                                                        kv_pos)
  np.testing.assert_allclose(jnp.sum(probe * traced),
                             loss(q, k, v, False), rtol=1e-5)


def test_chunked_memory_is_linear_in_length():
  """Doubling both lengths ~doubles the chunked kernel's temporaries and
  ~quadruples the einsum kernel's."""
  def temp_bytes(kernel, length):
    shape = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    f = jax.jit(lambda q, k, v: attention.dot_product_attention(
        q, k, v, is_causal=True, kernel=kernel, chunk_size=64))
    return f.lower(shape, shape, shape).compile().memory_analysis(
    ).temp_size_in_bytes

  einsum = temp_bytes('einsum', 1024), temp_bytes('einsum', 2048)
  chunked = temp_bytes('chunked', 1024), temp_bytes('chunked', 2048)
  assert einsum[1] > 3.5 * einsum[0]
  assert chunked[1] < 2.5 * chunked[0]
  assert chunked[1] < einsum[1] / 8


def test_chunked_backward_memory_is_linear_in_length():
  """The chunked kernel's backward pass recomputes each chunk's softmax
  from the output and the rows' log-sum-exp: its temporaries grow linearly
  with the length, not with length x number of chunks as when the scan is
  differentiated (which stores an accumulator per chunk)."""
  def temp_bytes(length):
    shape = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    f = jax.jit(jax.grad(lambda q, k, v: attention.dot_product_attention(
        q, k, v, is_causal=True, kernel='chunked', chunk_size=64).sum(),
                         argnums=(0, 1, 2)))
    return f.lower(shape, shape, shape).compile().memory_analysis(
    ).temp_size_in_bytes

  small, large = temp_bytes(2048), temp_bytes(8192)
  # 4x the length: ~4x the memory; storing a [t, d] accumulator per chunk
  # would be ~16x.
  assert large < 5 * small, (small, large)


def test_multi_head_attention_equals_flax_given_the_same_weights():
  rng = np.random.default_rng(1)
  x_q = rng.normal(size=(B, Q, 16)).astype(np.float32)
  x_kv = rng.normal(size=(B, K, 16)).astype(np.float32)
  mask = attention.padding_mask(Q_VALID, KV_VALID)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4)
  params = flax_mha.init(jax.random.PRNGKey(0), x_q, x_kv)['params']
  ours = attention.MultiHeadAttention(num_heads=4)
  # Same names and shapes: Flax's parameters load into ours unchanged.
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, nn.unbox(jax.eval_shape(functools.partial(
          ours.init, train=False), jax.random.PRNGKey(1), x_q, x_kv)[
              'params']))
  for kv, m in ((x_kv, mask), (None, attention.causal_mask(Q, Q))):
    expected = jax.jit(flax_mha.apply)({'params': params}, x_q, kv, mask=m)
    got = jax.jit(functools.partial(ours.apply, train=False))(
        {'params': params}, x_q, kv, mask=m)
    # Flax's fully masked row (query 4 of example 0) is a uniform average;
    # ours is defined as zero output (before the output bias).
    keep = np.ones((B, Q), bool) if kv is None else Q_VALID
    np.testing.assert_allclose(np.asarray(got)[keep],
                               np.asarray(expected)[keep], atol=1e-5)


def test_multi_head_attention_sows_weights_and_supports_mqa():
  x = np.random.default_rng(2).normal(size=(B, Q, 16)).astype(np.float32)
  mha = attention.MultiHeadAttention(num_heads=4, num_kv_heads=1)
  shapes = nn.unbox(jax.eval_shape(functools.partial(mha.init, train=False),
                                   jax.random.PRNGKey(0), x)['params'])
  assert shapes['key']['kernel'].shape == (16, 1, 4)
  assert shapes['query']['kernel'].shape == (16, 4, 4)
  # Random parameters, biases included, rather than a fresh init.
  rng = np.random.default_rng(5)
  params = jax.tree.map(
      lambda s: (0.3 * rng.standard_normal(s.shape)).astype(np.float32),
      shapes)
  out, state = jax.jit(functools.partial(
      mha.apply, is_causal=True, train=False, mutable=['intermediates']))(
          {'params': params}, x)
  (w,) = state['intermediates']['attention_weights']
  assert w.shape == (B, 4, Q, Q)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
  assert np.all(np.triu(np.asarray(w)[0, 0], 1) == 0)
  # The same output from NumPy, projecting by hand.
  def proj(name, heads):
    p = params[name]
    return np.einsum('bld,dhk->blhk', x, p['kernel']) + p['bias']
  ref, _ = numpy_attention(proj('query', 4), proj('key', 1), proj('value', 1),
                           np.asarray(attention.causal_mask(Q, Q)))
  ref = np.einsum('blhk,hkd->bld', ref, params['out']['kernel'])
  np.testing.assert_allclose(out, ref + params['out']['bias'], atol=1e-5)


def test_weight_dropout_only_with_einsum():
  x = np.ones((1, 3, 8), np.float32)
  mha = attention.MultiHeadAttention(num_heads=2, dropout_rate=0.5,
                                     kernel='xla')
  params = jax.eval_shape(functools.partial(mha.init, train=False),
                          jax.random.PRNGKey(0), x)['params']
  with pytest.raises(ValueError, match="use kernel='einsum'"):
    jax.eval_shape(functools.partial(mha.apply, train=True),
                   {'params': params}, x,
                   rngs={'dropout': jax.random.PRNGKey(1)})


def test_rope_scores_depend_only_on_the_offset():
  rng = np.random.default_rng(4)
  q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)

  def score(m, n):
    return float(np.sum(positional.apply_rope(q, jnp.array([m]))
                        * positional.apply_rope(k, jnp.array([n]))))

  for m, n in ((3, 1), (10, 2), (0, 5)):
    assert score(m, n) == pytest.approx(score(m + 37, n + 37), abs=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3
  assert score(0, 0) == pytest.approx(float(np.sum(q * k)), abs=1e-5)
  # A rotation: norms are kept.
  np.testing.assert_allclose(
      np.linalg.norm(positional.apply_rope(q, jnp.array([7]))),
      np.linalg.norm(q), rtol=1e-5)


def test_sinusoidal_encodings():
  e = positional.sinusoidal_encoding(jnp.arange(4), 8)
  assert e.shape == (4, 8)
  # Position 0: sin = 0, cos = 1; the fastest frequency is 1 rad/position.
  np.testing.assert_allclose(e[0], [0, 0, 0, 0, 1, 1, 1, 1], atol=1e-7)
  np.testing.assert_allclose(e[1, 0], np.sin(1.0), atol=1e-6)
  grid = positional.sinusoidal_encoding_2d(2, 3, 8)
  assert grid.shape == (6, 8)
  # Patch (1, 2): row code of row 1, column code of column 2.
  np.testing.assert_allclose(
      grid[5], np.concatenate([positional.sinusoidal_encoding(1, 4),
                               positional.sinusoidal_encoding(2, 4)]),
      atol=1e-6)


def test_rope_tables_are_constants_when_positions_are_known():
  """Positions known while tracing (NumPy, as every layer builds them outside
  decoding) give the same rotation as traced ones, and leave no sin or cos
  for the step to compute (XLA would evaluate them again for every head and
  batch row)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 3, 8)),
                  jnp.float32)
  known = jax.jit(lambda x: positional.apply_rope(x, np.arange(6)))
  traced = jax.jit(positional.apply_rope)
  np.testing.assert_allclose(known(x), traced(x, jnp.arange(6)), atol=1e-6)
  ops = {e.primitive.name for e in jax.make_jaxpr(
      lambda x: positional.apply_rope(x, np.arange(6)))(x).jaxpr.eqns}
  assert not ops & {'sin', 'cos'}


_BLOCKED_ON_EIGHT_DEVICES = r'''
import re, jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from bigjax.models import attention
assert jax.device_count() == 8
mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
shard = NamedSharding(mesh, P('data'))
rng = np.random.default_rng(0)
q, k, v = (jax.device_put(rng.normal(size=(16, 12, 2, 4)).astype(np.float32),
                          shard) for _ in range(3))
def loss(kernel):
  return lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
      q, k, v, is_causal=True, kernel=kernel, block_queries=4,
      block_logits=2 * 4 * 12)))
want = jax.jit(jax.grad(loss('einsum'), (0, 1, 2)))(q, k, v)
step = jax.jit(jax.grad(loss('blocked'), (0, 1, 2)), out_shardings=shard)
for g, w in zip(step(q, k, v), want):
  np.testing.assert_allclose(g, w, atol=1e-5)
hlo = step.lower(q, k, v).compile().as_text()
assert 'while' in hlo  # One of each device's two examples per block.
found = re.findall(r'all-gather|all-to-all|all-reduce|collective-permute', hlo)
assert not found, found
print('ok')
'''


def test_blocked_kernel_keeps_a_data_parallel_batch_on_its_devices():
  """On 8 devices with the batch split over them, each block holds some of
  every device's examples: same gradients as einsum, and no collective."""
  env = dict(os.environ,
             XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _BLOCKED_ON_EIGHT_DEVICES],
                          env=env, capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode == 0 and 'ok' in result.stdout, result.stderr[-3000:]
