"""Gradients of the written-out kernels on meshes against one device.

Run by tests/test_sharding.py in a process of 8 simulated CPU devices:
`python -m tests.mesh_gradients` prints one line per case and exits 1 if a
gradient on a mesh differs from the same computation on one device by more
than rounding. A written-out backward pass (a custom VJP) is partitioned by
XLA's SPMD pass like any program, and that pass has miscompiled one form of
the LSTM's (see `bigjax/models/fused_lstm.py`), so each is checked here with
its operands laid out as the sharding presets lay them out.
"""

import functools
import itertools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bigjax.models import attention
from bigjax.models import fused_lstm
from bigjax.models import layer_norm

MESHES = ((2, 2, 2), (1, 8, 1), (2, 1, 4), (8, 1, 1))
# (time, batch, input, hidden): the benchmark's shapes scaled down, and
# sizes that split unevenly into the kernel's [h; x] rows.
SHAPES = ((7, 16, 28, 16), (5, 8, 12, 8), (6, 16, 3, 32))
RTOL = 1e-5


def _spec(mesh, shape, names):
  """PartitionSpec of `names`, leaving a dimension whole where the mesh axes
  do not divide it (as bigjax.sharding's rules do)."""
  out = []
  for size, name in zip(shape, names):
    axes = () if name is None else (name if isinstance(name, tuple)
                                    else (name,))
    parts = int(np.prod([mesh.shape[a] for a in axes]))
    out.append(name if size % parts == 0 else None)
  return NamedSharding(mesh, P(*out))


def _mesh(mesh_shape):
  return jax.make_mesh(mesh_shape, ('data', 'fsdp', 'tensor'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 3)


def _max_difference(grad, args, shardings):
  """Max relative difference of `grad(*args)` with `args` placed on
  `shardings` against the same on one device, over all its outputs."""
  want = jax.jit(grad)(*args)
  placed = [jax.device_put(a, s) for a, s in zip(args, shardings)]
  got = jax.jit(grad, in_shardings=shardings)(*placed)
  return max(float(np.abs(np.asarray(g) - np.asarray(w)).max()
                   / np.abs(np.asarray(w)).max()) for g, w in zip(got, want))


def lstm_case(mesh_shape, shape):
  """Max relative difference of the fused LSTM's gradients (kernel, bias,
  inputs, starting carry; reversed, padded) on `mesh_shape` vs one device."""
  t, b, i, h = shape
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  kernel, bias = normal(h + i, 4 * h) * 0.3, normal(4 * h) * 0.1
  xs, c0, weights = normal(t, b, i), normal(b, h), normal(t, b, h)
  valid = jnp.asarray(rng.random((t, b)) < 0.8)

  def loss(kernel, bias, xs, c0):
    (c, h_last), ys = fused_lstm.lstm_over_time(kernel, bias, xs, c0,
                                                c0 * 0.5, valid, True)
    return jnp.sum(ys * weights) + jnp.sum(h_last * c)

  mesh = _mesh(mesh_shape)
  # As the 'fsdp_tensor' preset lays them out: kernel (rnn_in, rnn_gates) ->
  # (fsdp, tensor), bias -> tensor, the batch over data and fsdp.
  batch = ('data', 'fsdp')
  shardings = (_spec(mesh, kernel.shape, ('fsdp', 'tensor')),
               _spec(mesh, bias.shape, ('tensor',)),
               _spec(mesh, xs.shape, (None, batch, None)),
               _spec(mesh, c0.shape, (batch, None)))
  return _max_difference(jax.grad(loss, argnums=(0, 1, 2, 3)),
                         (kernel, bias, xs, c0), shardings)


def attention_case(mesh_shape, kernel):
  """The same for an attention kernel with its own backward: q, k, v
  [batch 8, 48 tokens, 4 heads, 8], causal, with padding and RoPE, heads
  over the tensor axis (as the attention projections' outputs are)."""
  rng = np.random.default_rng(1)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  q, k, v, weights = (normal(8, 48, 4, 8) for _ in range(4))
  kv_valid = jnp.arange(48)[None, :] < jnp.array([48, 40, 9, 48] * 2)[:, None]
  positions = jnp.arange(48)

  def loss(q, k, v):
    out = attention.dot_product_attention(
        q, k, v, is_causal=True, kv_valid=kv_valid, kernel=kernel,
        chunk_size=16, block_queries=16, block_logits=2 * 4 * 16 * 48,
        rope=(positions, positions))
    return jnp.sum(jnp.sin(out) * weights)

  sharding = _spec(_mesh(mesh_shape), q.shape,
                   (('data', 'fsdp'), None, 'tensor', None))
  return _max_difference(jax.grad(loss, argnums=(0, 1, 2)), (q, k, v),
                         (sharding,) * 3)


def layer_norm_case(mesh_shape):
  """The same for the LayerNorm: x [batch 8, 12 tokens, 16] over the batch
  axes, scale and bias ('embed') over fsdp, as the presets lay them out."""
  rng = np.random.default_rng(2)
  normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)
  x, weights = normal(8, 12, 16) * 2.0 + 1.0, normal(8, 12, 16)
  scale, bias = normal(16), normal(16)

  def loss(x, scale, bias):
    return jnp.sum(jnp.sin(layer_norm.layer_norm(x, scale, bias, 1e-6))
                   * weights)

  mesh = _mesh(mesh_shape)
  shardings = (_spec(mesh, x.shape, (('data', 'fsdp'), None, None)),
               _spec(mesh, scale.shape, ('fsdp',)),
               _spec(mesh, bias.shape, ('fsdp',)))
  return _max_difference(jax.grad(loss, argnums=(0, 1, 2)),
                         (x, scale, bias), shardings)


def main():
  assert jax.device_count() == 8, 'run with 8 (simulated) devices'
  cases = [(f'fused_lstm mesh {m} shape {s}', functools.partial(lstm_case, m, s))
           for m, s in itertools.product(MESHES, SHAPES)]
  cases += [(f'{k} attention mesh {m}', functools.partial(attention_case, m, k))
            for m, k in itertools.product(MESHES, ('blocked', 'chunked'))]
  cases += [(f'layer_norm mesh {m}', functools.partial(layer_norm_case, m))
            for m in MESHES]
  failed = False
  for name, case in cases:
    error = case()
    bad = not error <= RTOL
    failed |= bad
    print(f'{name}: max relative difference {error:.1e}'
          f'{"  FAILED" if bad else ""}', flush=True)
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
