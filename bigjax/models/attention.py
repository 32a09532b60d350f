"""Scaled dot-product attention: masks, three kernels, and a multi-head layer.

Shapes follow `jax.nn.dot_product_attention`: queries [batch, q_len, heads,
head_dim], keys and values [batch, kv_len, kv_heads, head_dim]. Grouped-query
attention (GQA) and multi-query attention (MQA, kv_heads == 1) need heads to
be a multiple of kv_heads; query head n reads key/value head n // (heads //
kv_heads), as in `jax.nn.dot_product_attention`.

Masks are boolean, True where a query may attend a key, and broadcast to
[batch, heads, q_len, kv_len]. Two ways to say which keys are visible:
  * `mask`: any dense pattern (e.g. `causal_mask(...) & padding_mask(...)`);
  * `is_causal`, `q_valid`, `kv_valid`: the structured equivalents of
    `causal_mask` and `padding_mask`. The 'chunked' kernel builds them one
    key chunk at a time, so its memory stays linear in the sequence lengths;
    the other kernels turn them into a dense mask.
All of them may be given at once; a key is visible when every one allows it.

A query row that may see no key at all (a padded query, or a query before
every visible key) outputs zeros and, for the 'einsum' kernel, all-zero
weights, in every kernel: never NaN, and never an average of keys it was told
not to read.
"""

import functools
from typing import NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from bigjax.models import axes
from bigjax.models import dense
from bigjax.models import positional

KERNELS = ('einsum', 'xla', 'cudnn', 'chunked', 'blocked')

# Logit given to masked pairs. Finite, unlike -inf, so that a fully masked row
# has a well-defined (uniform) softmax and max-subtraction never gives NaN;
# such rows are then zeroed explicitly.
_MASKED = -1e30


def causal_mask(q_len: int, kv_len: int):
  """bool [1, 1, q_len, kv_len]: query i sees keys j <= i + kv_len - q_len.

  The last query is aligned with the last key, so a query block that
  continues a longer key sequence (kv_len > q_len, as in cached decoding)
  sees the whole prefix. For q_len == kv_len this is the usual lower
  triangle.
  """
  offset = kv_len - q_len
  q = jnp.arange(q_len)[:, None]
  k = jnp.arange(kv_len)[None, :]
  return (k <= q + offset)[None, None]


def padding_mask(q_valid=None, kv_valid=None):
  """bool [batch, 1, q_len|1, kv_len|1] from validity vectors.

  Args:
    q_valid: bool [batch, q_len], False at padded queries, or None.
    kv_valid: bool [batch, kv_len], False at padded keys, or None.
  """
  if q_valid is None and kv_valid is None:
    raise ValueError('padding_mask needs q_valid or kv_valid')
  mask = True
  if q_valid is not None:
    mask = mask & q_valid[:, None, :, None]
  if kv_valid is not None:
    mask = mask & kv_valid[:, None, None, :]
  return mask


def combine_masks(*masks):
  """The AND of the masks that are not None (None if all are None)."""
  masks = [m for m in masks if m is not None]
  if not masks:
    return None
  return functools.reduce(jnp.logical_and, masks)


def _dense_mask(mask, is_causal, q_valid, kv_valid, q_len, kv_len):
  """All mask forms as one dense mask broadcastable to [b, h, q, k], or None."""
  return combine_masks(
      None if mask is None else jnp.asarray(mask, bool),
      causal_mask(q_len, kv_len) if is_causal else None,
      padding_mask(q_valid, kv_valid)
      if q_valid is not None or kv_valid is not None else None)


def _as_4d(mask):
  """Left-pads a mask's shape with ones up to [b, h, q, k]."""
  return mask.reshape((1,) * (4 - mask.ndim) + mask.shape)


def _group_queries(q, num_kv_heads):
  """[b, q, heads, d] -> [b, q, kv_heads, heads // kv_heads, d]."""
  b, t, n, d = q.shape
  if n % num_kv_heads:
    raise ValueError(f'{n} query heads are not a multiple of {num_kv_heads} '
                     'key/value heads')
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, d)


def _stat_dtype(x):
  """float32, or x's dtype if wider: logits and softmax statistics never
  drop below float32 (bfloat16 inputs) nor below the input (float64 tests)."""
  return jnp.promote_types(x.dtype, jnp.float32)


def _masked_softmax(logits, mask, dtype):
  """softmax over the last axis where `mask` (None: everywhere) is True, in
  float32 (or wider) whatever the logits' dtype, returned in `dtype`. Rows
  with no visible entry come out all zero, not uniform."""
  logits = logits.astype(_stat_dtype(logits))
  if mask is None:
    return jax.nn.softmax(logits, axis=-1).astype(dtype)
  weights = jax.nn.softmax(jnp.where(mask, logits, _MASKED), axis=-1)
  return jnp.where(mask, weights, 0.0).astype(dtype)


def _einsum_attention(q, k, v, mask, *, dropout_rate, dropout_rng):
  """The plain softmax(QK^T / sqrt(d))V, with the [b, h, q, k] weights."""
  b, t, n, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  qg = _group_queries(q, kv_heads) * jnp.asarray(d ** -0.5, q.dtype)
  # In q's dtype: a float32 result here would make the backward pass's
  # matmuls mixed-dtype. The softmax itself is float32.
  logits = jnp.einsum('btkgd,bskd->bkgts', qg, k).reshape(b, n, t, s)
  weights = _masked_softmax(logits, mask, v.dtype)
  applied = weights
  if dropout_rate > 0.0 and dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    applied = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
  out = jnp.einsum('bkgts,bskd->btkgd',
                   applied.reshape(b, kv_heads, n // kv_heads, t, s), v)
  return out.reshape(b, t, n, d), weights


def _zero_empty_rows(out, mask):
  """Zeros the outputs [b, q, h, d] of query rows that see no key."""
  b, t, n, _ = out.shape
  any_visible = jnp.broadcast_to(_as_4d(mask).any(-1), (b, n, t))
  return jnp.where(any_visible.transpose(0, 2, 1)[..., None], out, 0.0)


def _xla_attention(q, k, v, mask, *, implementation):
  """`jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel on GPU)."""
  b, t, n, _ = q.shape
  s = k.shape[1]
  if mask is not None:
    mask = jnp.broadcast_to(_as_4d(mask), (b, n, t, s))
  out = jax.nn.dot_product_attention(q, k, v, mask=mask,
                                     implementation=implementation)
  # jax gives fully masked rows a uniform average; we promise zeros.
  return out if mask is None else _zero_empty_rows(out, mask)


def _chunked_attention(q, k, v, mask, *, is_causal, q_valid, kv_valid,
                       chunk_size):
  """Online-softmax attention over key/value chunks (flash-attention style).

  Keys and values are visited `chunk_size` at a time under `lax.scan`,
  carrying the running row maximum m, the running softmax denominator l and
  the unnormalised output; each chunk rescales them by exp(m_old - m_new).
  Causal and padding masks are built per chunk from positions and validity
  vectors, so no pass holds more than O(q_len * chunk_size) logits. The
  backward pass (`_flash`'s custom VJP) keeps only the output and each row's
  log-sum-exp from the forward pass and recomputes each chunk's softmax from
  them, as FlashAttention-2 does: memory O((q_len + kv_len) * head_dim), not
  the O(q_len * head_dim * kv_len / chunk_size) of differentiating the scan.
  Logits, softmax statistics and accumulators are float32 (or wider, for
  float64 inputs); the output has the dtype of q. A dense `mask` still works but is
  itself O(q_len * kv_len).
  """
  b, t, n, d = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  qg = _group_queries(q, kv_heads) * jnp.asarray(d ** -0.5, q.dtype)
  num_chunks = -(-s // chunk_size)
  pad = num_chunks * chunk_size - s
  if kv_valid is None:
    kv_valid = jnp.ones((b, s), bool)

  def chunked(x, axis):
    """Pads `axis` (length s) to whole chunks and splits it:
    [..., s, ...] -> [num_chunks, ..., chunk_size, ...]."""
    x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    x = jnp.moveaxis(x, axis, 0)
    x = x.reshape((num_chunks, chunk_size) + x.shape[1:])
    return jnp.moveaxis(x, 1, axis + 1)

  # Padding keys are invalid (jnp.pad fills False).
  vis = {'valid': chunked(kv_valid, 1),
         'start': jnp.arange(num_chunks) * chunk_size}
  if mask is not None:
    mask = _as_4d(jnp.asarray(mask, bool))
    mb, mh = mask.shape[:2]
    # [b|1, heads|1, t|1, s|1] -> [b|1, K|1, g|1, t|1, s|1], as the logits.
    mask = (mask.reshape((mb, kv_heads, n // kv_heads) + mask.shape[2:])
            if mh == n else mask[:, :, None])
    if mask.shape[-1] == 1:
      vis['mask_all'] = mask
    else:
      vis['mask'] = chunked(mask, 4)
  out = _flash(_FlashShape(t, s, is_causal), qg, chunked(k, 1),
               chunked(v, 1), vis)
  out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d).astype(q.dtype)
  if q_valid is not None:
    out = jnp.where(q_valid[:, :, None, None], out, 0.0)
  return out


class _Blocks(NamedTuple):
  """Static facts of a `_blocked` call (hashable, a custom_vjp nondiff arg).

  `iterations` blocks of examples; `strided`: block i holds examples i,
  i + iterations, ... rather than a contiguous run (see _blocked_attention).
  """
  q_len: int
  kv_len: int
  is_causal: bool
  block_queries: int
  iterations: int
  strided: bool

  def pieces(self):
    """(start, stop, end) of each piece: queries [start, stop) see keys
    [0, end) at most (all keys without the causal mask, aligned as in
    causal_mask with it)."""
    t, s = self.q_len, self.kv_len
    out = []
    for start in range(0, t, self.block_queries):
      stop = min(start + self.block_queries, t)
      out.append((start, stop,
                  max(0, min(s, stop + s - t)) if self.is_causal else s))
    return out

  def split(self, x):
    """[b, ...] -> [iterations, b // iterations, ...], contiguous or strided."""
    b, rest = x.shape[0], x.shape[1:]
    if not self.strided:
      return x.reshape((self.iterations, b // self.iterations) + rest)
    return jnp.moveaxis(
        x.reshape((b // self.iterations, self.iterations) + rest), 1, 0)

  def merge(self, x):
    """The inverse of `split`."""
    if self.strided:
      x = jnp.moveaxis(x, 0, 1)
    return x.reshape((-1,) + x.shape[2:])


def _head_major(x, kv_heads):
  """[e, t, heads, d] -> [e, kv_heads, heads // kv_heads, t, d]."""
  return _group_queries(x, kv_heads).transpose(0, 2, 3, 1, 4)


def _token_major(x):
  """[e, kv_heads, g, t, d] -> [e, t, kv_heads * g, d]."""
  e, kv_heads, g, t, d = x.shape
  return x.transpose(0, 3, 1, 2, 4).reshape(e, t, kv_heads * g, d)


def _block_mask(cfg, side):
  """This block's dense mask [e|1, heads|1, t|1, s|1] from `side`, or None."""
  return _dense_mask(side.get('mask'), cfg.is_causal, side.get('q_valid'),
                     side.get('kv_valid'), cfg.q_len, cfg.kv_len)


def _piece_logits(dense, qs, kt, start, stop, end):
  """Scaled logits of one piece, float32, masked to _MASKED.

  qs [e, K, g, tq, d] (already scaled), kt [e, K, d, end] -> [e, K, g, tq,
  end]. `dense` (the block's `_block_mask`) is sliced to the piece.
  """
  logits = jnp.einsum('bkgtd,bkds->bkgts', qs, kt).astype(_stat_dtype(qs))
  if dense is None:
    return logits
  mask = dense[:, :, slice(start, stop) if dense.shape[2] > 1 else slice(None),
               slice(0, end) if dense.shape[3] > 1 else slice(None)]
  # [e|1, heads|1, ...] -> [e|1, K|1, g|1, ...], as the logits.
  kv_heads, g = qs.shape[1:3]
  mask = (mask.reshape(mask.shape[0], kv_heads, g, *mask.shape[2:])
          if mask.shape[1] > 1 else mask[:, :, None])
  return jnp.where(mask, logits, _MASKED)


def _rotated(side, q, k, inverse=False):
  """q and k turned by RoPE's tables in `side` (if any), or back."""
  if 'q_cos' not in side:
    return q, k
  sign = -1 if inverse else 1
  return (positional.rotate(q, side['q_cos'], sign * side['q_sin']),
          positional.rotate(k, side['kv_cos'], sign * side['kv_sin']))


def _block_forward(cfg, side, q, k, v):
  """One block of examples: q [e, t, heads, d], k, v [e, s, K, d] ->
  (out [e, t, heads, d], log-sum-exp [e, K, g, t] of each row's logits;
  +1e30 for rows that see no key, so that exp(logits - lse) is 0)."""
  kv_heads, d = k.shape[2:]
  q, k = _rotated(side, q, k)
  qh = _head_major(q, kv_heads) * jnp.asarray(d ** -0.5, q.dtype)
  kt, vh = k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)
  dense = _block_mask(cfg, side)
  outs, lses = [], []
  for start, stop, end in cfg.pieces():
    if end == 0:
      outs.append(jnp.zeros_like(qh[:, :, :, start:stop]))
      lses.append(jnp.full(qh.shape[:3] + (stop - start,), -_MASKED,
                           _stat_dtype(q)))
      continue
    logits = _piece_logits(dense, qh[:, :, :, start:stop], kt[..., :end],
                           start, stop, end)
    top = logits.max(-1, keepdims=True)
    p = jnp.exp(logits - top)
    total = p.sum(-1, keepdims=True)
    seen = top > _MASKED / 2
    out = jnp.einsum('bkgts,bksd->bkgtd', p.astype(v.dtype), vh[:, :, :end])
    outs.append(out * jnp.where(seen, 1.0 / total, 0.0).astype(out.dtype))
    lses.append(jnp.where(seen, top + jnp.log(total), -_MASKED)[..., 0])
  return _token_major(jnp.concatenate(outs, 3)), jnp.concatenate(lses, -1)


def _block_backward(cfg, side, q, k, v, out, lse, d_out):
  """One block's (dq, dk, dv), each the shape of its input, from the
  softmax recomputed with the saved log-sum-exp (FlashAttention-2's
  backward): dS = P * (dO V^T - rowsum(dO * O))."""
  kv_heads, d = k.shape[2:]
  scale = jnp.asarray(d ** -0.5, q.dtype)
  stat = lse.dtype
  delta = _head_major(jnp.sum(d_out.astype(stat) * out.astype(stat), -1,
                              keepdims=True), kv_heads)[..., 0]
  q, k = _rotated(side, q, k)
  qh, d_outh = _head_major(q, kv_heads) * scale, _head_major(d_out, kv_heads)
  kh, kt, vt = (k.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1),
                v.transpose(0, 2, 3, 1))
  dense = _block_mask(cfg, side)
  dqs, dks, dvs = [], [], []
  for start, stop, end in cfg.pieces():
    if end == 0:
      dqs.append(jnp.zeros_like(qh[:, :, :, start:stop]))
      continue
    qs, d_outs = qh[:, :, :, start:stop], d_outh[:, :, :, start:stop]
    logits = _piece_logits(dense, qs, kt[..., :end], start, stop, end)
    p = jnp.exp(logits - lse[..., start:stop, None])
    dp = jnp.einsum('bkgtd,bkds->bkgts', d_outs, vt[..., :end]).astype(stat)
    ds = (p * (dp - delta[..., start:stop, None])).astype(q.dtype)
    dqs.append(jnp.einsum('bkgts,bksd->bkgtd', ds, kh[:, :, :end]))
    # Keys [0, end) only: padded to all keys, summed over the pieces.
    pad = ((0, 0), (0, 0), (0, 0), (0, cfg.kv_len - end))
    dks.append(jnp.pad(jnp.einsum('bkgtd,bkgts->bkds', qs, ds), pad))
    dvs.append(jnp.pad(jnp.einsum('bkgtd,bkgts->bkds', d_outs,
                                  p.astype(v.dtype)), pad))
  dk = functools.reduce(jnp.add, dks).transpose(0, 3, 1, 2)
  dv = functools.reduce(jnp.add, dvs).transpose(0, 3, 1, 2)
  dq = _token_major(jnp.concatenate(dqs, 3) * scale)
  dq, dk = _rotated(side, dq, dk, inverse=True)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _blocked(cfg, q, k, v, side):
  """`_blocked_attention`'s output. side: the inputs that get no gradient
  (masks, RoPE tables), {'mapped': {name: [b, ...]} (split into blocks with
  the examples), 'whole': {name: array} (read whole by every block)}."""
  return _blocked_fwd(cfg, q, k, v, side)[0]


def _block_side(side, mapped):
  return {**side['whole'], **mapped}


def _blocked_fwd(cfg, q, k, v, side):
  blocks = jax.tree.map(cfg.split, {'q': q, 'k': k, 'v': v,
                                    'side': side['mapped']})
  out, lse = lax.map(lambda xs: _block_forward(
      cfg, _block_side(side, xs['side']), xs['q'], xs['k'], xs['v']),
                     blocks)
  out = cfg.merge(out)
  return out, (q, k, v, side, out, lse)


def _blocked_bwd(cfg, residuals, d_out):
  q, k, v, side, out, lse = residuals
  blocks = jax.tree.map(cfg.split, {'q': q, 'k': k, 'v': v, 'out': out,
                                    'd_out': d_out, 'side': side['mapped']})
  blocks['lse'] = lse  # Made in blocks.
  dq, dk, dv = lax.map(lambda xs: _block_backward(
      cfg, _block_side(side, xs['side']), xs['q'], xs['k'], xs['v'],
      xs['out'], xs['lse'], xs['d_out']), blocks)
  return cfg.merge(dq), cfg.merge(dk), cfg.merge(dv), None


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def _blocked_attention(q, k, v, mask, *, is_causal, q_valid, kv_valid,
                       block_queries, block_logits, rope=None):
  """Exact attention in cache-sized pieces: the CPU's fast kernel.

  The einsum kernel's softmax(QK^T)V, computed for a few examples at a time
  (`lax.map`: as many as keep their logits within `block_logits` elements)
  and, inside those, `block_queries` queries at a time. Under a causal mask
  a block of queries only computes the prefix of keys it can see, skipping
  the masked half of the work. Every piece is small enough to stay in a
  core's cache, where the einsum kernel streams [batch, heads, q_len,
  kv_len] tensors through main memory some fifteen times a step.

  Its backward pass is written out (`_blocked`'s custom VJP), as
  FlashAttention-2's: it keeps only the output and each row's log-sum-exp,
  recomputes each piece's softmax from them, and forms dS = P * (dO V^T -
  rowsum(dO * O)). Inside a block, pieces work head-major with K^T formed
  once, so that every product is a plain batched matmul.

  Measured on one core (4 heads of 64, 256 tokens, batch 32, causal,
  forward + backward, 64 queries a piece): einsum 117-124 ms, this
  kernel's first form (`jax.checkpoint`ed blocks, autodiff backward) 80-85
  ms alone, this one 103-108 ms alone; but inside the benchmark GPT's step
  (4 such layers) this one made the step 2.00-2.03 s against 2.05-2.13 s,
  its residuals being q, k, v and the output rather than every block's
  inputs stacked again. PyTorch's fused `scaled_dot_product_attention`: 79
  ms alone. In that step, 128 queries a piece and 2 examples a block (1 MB
  of logits) were the fastest: 1.94 s, against 2.02-2.03 s with 64 queries
  and 4 examples, 2.12 s with 32 queries, 2.06 s with all 256 at once.

  With `rope` (query and key positions) each block turns its queries and
  keys by RoPE itself, in cache, and turns their gradients back: the
  rotation's own passes over q, k and their gradients in the step (49 ms of
  the benchmark GPT's) are gone.

  Values and gradients are the einsum kernel's (up to rounding); rows that
  see no key output zeros, with zero gradients.
  """
  b, t, n, d = q.shape
  s = k.shape[1]
  # `iterations` blocks of examples, each keeping a device's logits within
  # block_logits: the fewest that divide the batch per device (assuming all
  # devices hold a share). On one device block i holds examples [i * e,
  # (i + 1) * e). On several, block i holds examples i, i + iterations, ...:
  # with the batch split over devices (data parallelism, contiguous shards)
  # every device then keeps its own examples in every block, where
  # contiguous blocks made XLA gather the whole batch onto every device (8
  # CPU devices: 6 all-gathers of q, k and v a layer). The strided blocks
  # cost transposing copies, which made one device's GPT step 9% slower.
  per_example = n * min(t, block_queries) * s
  devices = jax.device_count()
  local = b // devices if b % devices == 0 else 1
  iterations = min([i for i in range(1, local + 1) if local % i == 0
                    and local // i * per_example <= block_logits] or [local])
  mapped = {name: x for name, x in (('q_valid', q_valid),
                                    ('kv_valid', kv_valid)) if x is not None}
  whole = {}

  def add_side(name, x):
    """A mask or table over the batch is split with it; a broadcast one
    ([1, ...]) is read whole by every block."""
    (mapped if x.shape[0] == b and b > 1 else whole)[name] = x

  if mask is not None:
    add_side('mask', _as_4d(jnp.asarray(mask, bool)))
  if rope is not None:
    for name, positions in zip(('q', 'kv'), rope):
      for part, table in zip(('cos', 'sin'),
                             positional.rope_tables(positions, d)):
        add_side(f'{name}_{part}', table)
  cfg = _Blocks(t, s, is_causal, block_queries, iterations,
                strided=devices > 1 and iterations > 1)
  return _blocked(cfg, q, k, v, {'mapped': mapped, 'whole': whole})


class _FlashShape(NamedTuple):
  """Static facts of a `_flash` call (hashable, a custom_vjp nondiff arg)."""
  q_len: int
  kv_len: int  # Before padding to whole chunks.
  is_causal: bool


def _chunk_logits(shape: _FlashShape, qg, k_chunk, vis_chunk):
  """Logits [b, K, g, t, c] of one key chunk in `_stat_dtype`, and where
  they are visible (bool, broadcastable to them)."""
  logits = jnp.einsum('btkgd,bckd->bkgtc', qg, k_chunk,
                      preferred_element_type=_stat_dtype(qg))
  visible = vis_chunk['valid'][:, None, None, None, :]
  if shape.is_causal:
    c = k_chunk.shape[1]
    # Aligned as in causal_mask: the last query sees the last key.
    q_pos = jnp.arange(shape.q_len)[:, None] + (shape.kv_len - shape.q_len)
    visible = visible & (vis_chunk['start'] + jnp.arange(c) <= q_pos)
  for key in ('mask', 'mask_all'):
    if key in vis_chunk:
      visible = visible & vis_chunk[key]
  return logits, visible


def _scan_chunks(body, init, k_chunks, v_chunks, vis):
  """`lax.scan` of body(carry, k_chunk, v_chunk, vis_chunk) over key chunks;
  'mask_all' (not chunked) is passed whole to every chunk."""
  whole = {key: x for key, x in vis.items() if key == 'mask_all'}
  per_chunk = {key: x for key, x in vis.items() if key != 'mask_all'}
  return lax.scan(
      lambda carry, xs: body(carry, xs[0], xs[1], {**xs[2], **whole}),
      init, (k_chunks, v_chunks, per_chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(shape: _FlashShape, qg, k_chunks, v_chunks, vis):
  """[b, K, g, t, d] in `_stat_dtype`: attention of grouped, pre-scaled qg
  [b, t, K, g, d] over keys and values [num_chunks, b, c, K, d]."""
  return _flash_forward(shape, qg, k_chunks, v_chunks, vis)[0]


def _flash_forward(shape, qg, k_chunks, v_chunks, vis):
  """The output and each query row's log-sum-exp [b, K, g, t] (0 for rows
  that see no key)."""
  b, t, kv_heads, g, d = qg.shape
  wide = _stat_dtype(qg)

  def body(carry, k_chunk, v_chunk, vis_chunk):
    m, l, acc = carry  # [b, K, g, t], [b, K, g, t], [b, K, g, t, d]
    logits, visible = _chunk_logits(shape, qg, k_chunk, vis_chunk)
    m_new = jnp.maximum(m, jnp.where(visible, logits, _MASKED).max(-1))
    # Masked entries are zeroed explicitly: in a row with nothing visible yet
    # m_new is _MASKED itself and exp(0) would count them.
    p = jnp.where(visible, jnp.exp(logits - m_new[..., None]), 0.0)
    rescale = jnp.exp(m - m_new)
    l = l * rescale + p.sum(-1)
    acc = acc * rescale[..., None] + jnp.einsum(
        'bkgtc,bckd->bkgtd', p.astype(v_chunk.dtype), v_chunk,
        preferred_element_type=wide)
    return (m_new, l, acc), None

  stats = jnp.zeros((b, kv_heads, g, t), wide)
  init = (stats + _MASKED, stats, jnp.zeros((b, kv_heads, g, t, d), wide))
  (m, l, acc), _ = _scan_chunks(body, init, k_chunks, v_chunks, vis)
  # Rows that saw no key have l == 0 and acc == 0: they output zeros.
  seen = l > 0
  out = acc / jnp.where(seen, l, 1.0)[..., None]
  lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)
  return out, lse


def _flash_fwd(shape, qg, k_chunks, v_chunks, vis):
  out, lse = _flash_forward(shape, qg, k_chunks, v_chunks, vis)
  return out, (qg, k_chunks, v_chunks, vis, out, lse)


def _flash_bwd(shape, residuals, d_out):
  """Gradients chunk by chunk from the softmax p = exp(logits - lse):
  dv = p^T dO, dp = dO v^T, ds = p (dp - rowsum(dO * O)), dq = ds k,
  dk = ds^T q."""
  qg, k_chunks, v_chunks, vis, out, lse = residuals
  wide = _stat_dtype(qg)
  row_dot = jnp.sum(d_out * out, -1)  # [b, K, g, t]
  d_out_c = d_out.astype(v_chunks.dtype)

  def body(dq, k_chunk, v_chunk, vis_chunk):
    logits, visible = _chunk_logits(shape, qg, k_chunk, vis_chunk)
    p = jnp.where(visible, jnp.exp(logits - lse[..., None]), 0.0)
    # The products run in the inputs' dtype (bfloat16 under mixed precision)
    # and accumulate in float32.
    dv = jnp.einsum('bkgtc,bkgtd->bckd', p.astype(v_chunk.dtype), d_out_c,
                    preferred_element_type=wide)
    dp = jnp.einsum('bkgtd,bckd->bkgtc', d_out_c, v_chunk,
                    preferred_element_type=wide)
    ds = (p * (dp - row_dot[..., None])).astype(qg.dtype)
    dq = dq + jnp.einsum('bkgtc,bckd->btkgd', ds, k_chunk,
                         preferred_element_type=wide)
    dk = jnp.einsum('bkgtc,btkgd->bckd', ds, qg,
                    preferred_element_type=wide)
    return dq, (dk.astype(k_chunk.dtype), dv.astype(v_chunk.dtype))

  dq, (dk, dv) = _scan_chunks(body, jnp.zeros(qg.shape, wide),
                              k_chunks, v_chunks, vis)
  # The masks and chunk starts are not differentiable: no cotangent.
  return dq.astype(qg.dtype), dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def dot_product_attention(q, k, v, *, mask=None, is_causal: bool = False,
                          q_valid=None, kv_valid=None, kernel: str = 'einsum',
                          chunk_size: int = 128, dropout_rate: float = 0.0,
                          dropout_rng=None, return_weights: bool = False,
                          block_queries: int = 128,
                          block_logits: int = 2 ** 18, rope=None):
  """softmax(QK^T / sqrt(head_dim)) V, per head, with GQA/MQA.

  Args:
    q: [batch, q_len, heads, head_dim].
    k, v: [batch, kv_len, kv_heads, head_dim]; heads % kv_heads == 0.
    mask: bool, broadcastable to [batch, heads, q_len, kv_len], True =
      attend; or None.
    is_causal: also apply `causal_mask(q_len, kv_len)`.
    q_valid, kv_valid: bool [batch, q_len] / [batch, kv_len], False at
      padding; also apply `padding_mask(q_valid, kv_valid)`.
    kernel: 'einsum' (plain; the only one that returns weights and applies
      dropout), 'xla' (`jax.nn.dot_product_attention`, implementation chosen
      by JAX), 'cudnn' (the same, forcing cuDNN's fused kernel; GPU only) or
      'chunked' (online softmax over key chunks; memory linear in lengths)
      or 'blocked' (exact attention in cache-sized pieces, skipping the keys
      a causal mask hides: the fastest on CPUs; `_blocked_attention`).
    chunk_size: keys per chunk of the 'chunked' kernel.
    block_queries, block_logits: the 'blocked' kernel's pieces: queries per
      piece, and the most logits (examples x heads x queries x keys) one
      block of examples may hold; the defaults (128; 1 MB of float32, half
      a core's L2 cache) were the fastest measured on the CPU in the
      benchmark GPT's step (`_blocked_attention`).
    dropout_rate: dropout on the attention weights ('einsum' only).
    dropout_rng: PRNG key for that dropout; None means no dropout.
    return_weights: also return the weights [batch, heads, q_len, kv_len]
      ('einsum' only).
    rope: (q_positions, kv_positions), int [length] or [batch, length]
      each: turn q and k by RoPE at those positions first
      (`positional.apply_rope`); the 'blocked' kernel does it inside its
      pieces. None: q and k are used as given.

  Returns:
    [batch, q_len, heads, head_dim], or (that, weights) if return_weights.
  """
  if kernel not in KERNELS:
    raise ValueError(f'unknown attention kernel {kernel!r}; use one of '
                     f'{KERNELS}')
  if kernel != 'einsum' and (return_weights or (
      dropout_rate > 0.0 and dropout_rng is not None)):
    raise ValueError(f"kernel {kernel!r} neither returns attention weights nor "
                     "applies dropout to them; use kernel='einsum'")
  if kernel == 'blocked':
    return _blocked_attention(q, k, v, mask, is_causal=is_causal,
                              q_valid=q_valid, kv_valid=kv_valid,
                              block_queries=block_queries,
                              block_logits=block_logits, rope=rope)
  if rope is not None:
    q, k = positional.apply_rope(q, rope[0]), positional.apply_rope(k, rope[1])
  if kernel == 'chunked':
    return _chunked_attention(q, k, v, mask, is_causal=is_causal,
                              q_valid=q_valid, kv_valid=kv_valid,
                              chunk_size=chunk_size)
  dense = _dense_mask(mask, is_causal, q_valid, kv_valid, q.shape[1],
                      k.shape[1])
  if kernel in ('xla', 'cudnn'):
    return _xla_attention(q, k, v, dense, implementation=(
        None if kernel == 'xla' else 'cudnn'))
  out, weights = _einsum_attention(q, k, v, dense, dropout_rate=dropout_rate,
                                   dropout_rng=dropout_rng)
  return (out, weights) if return_weights else out


class DecodeMasks(NamedTuple):
  """Where one decode call writes its keys and values, and what it sees.

  A decoding model builds it once per call (`transformer.decode_masks`) and
  every self-attention layer uses it. The call's n tokens go to cache slots
  slot .. slot + n - 1 of every row (one slot counter for the batch, so a
  layer's write is one in-place dynamic_update_slice); rows of different
  lengths differ in which slots hold real tokens, not in where they write.

  Attributes:
    slot: int32 [], where this call's keys and values go.
    visible: bool [batch, n, cache_len], the slots each of the call's
      queries may see: real tokens up to its own (its own included).
  """
  slot: jax.Array
  visible: jax.Array


def cache_layout(k, v):
  """Keys and values [batch, length, kv_heads, head_dim] as a decode cache
  stores them: keys [batch, kv_heads, head_dim, length], values [batch,
  kv_heads, length, head_dim].

  In both the axis `cached_attention` sums over for one query (head_dim for
  the scores, length for the output) is the second-minor one, which XLA
  reads in stored order; other layouts made it copy or transpose the whole
  cache every step (measured on CPU: 2-5 times the attention's own time).
  """
  return k.transpose(0, 2, 3, 1), v.transpose(0, 2, 1, 3)


def cached_attention(q, k, v, visible):
  """Attention of a decode call's queries over a cache (`cache_layout`).

  Args:
    q: [batch, q_len, heads, head_dim].
    k: [batch, kv_heads, head_dim, kv_len].
    v: [batch, kv_heads, kv_len, head_dim].
    visible: bool [batch, q_len, kv_len], True where a query may attend.

  Returns:
    [batch, q_len, heads, head_dim] (zeros for a query that sees nothing)
    and the weights [batch, heads, q_len, kv_len].
  """
  b, t, n, d = q.shape
  kv_heads = k.shape[1]
  qg = _group_queries(q, kv_heads).transpose(0, 2, 3, 1, 4) * jnp.asarray(
      d ** -0.5, q.dtype)
  # One query (a decode step) is a matrix-vector product. As a multiply
  # and a sum XLA streams the cache once; as a dot it first re-lays the
  # cache out (cache_layout). A prompt's block of queries is a real matmul.
  if t == 1:
    logits = jnp.sum(qg[..., None] * k[:, :, None, None], axis=-2)
  else:
    logits = jnp.einsum('bkgtd,bkds->bkgts', qg, k)
  # [b, 1, 1, t, s]: every head alike.
  weights = _masked_softmax(logits, visible[:, None, None], v.dtype)
  if t == 1:
    out = jnp.sum(weights[..., None] * v[:, :, None, None], axis=-2)
  else:
    out = jnp.einsum('bkgts,bksd->bkgtd', weights, v)
  return (out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, d),
          weights.reshape(b, n, t, -1))


class MultiHeadAttention(nn.Module):
  """Multi-head (or grouped-/multi-query) attention with its projections.

  Parameters mirror `flax.linen.MultiHeadDotProductAttention` ('query', 'key',
  'value': kernels [embed, heads, head_dim]; 'out': [heads, head_dim, embed]),
  so weights move between the two unchanged; 'key' and 'value' have
  num_kv_heads heads.

  Decoding keeps keys and values in the 'cache' collection (which must be
  mutable), batch-first (beam search reorders rows with one gather) in
  `cache_layout`, and attends with `cached_attention` whatever `kernel`
  says (the kernels differ in how they hold long query blocks; a decode
  step has one query):
    * self-attention, given `decode_masks`: 'cached_key' and 'cached_value'
      (`cache_layout`), created (zeros) by the first decode call, as long
      as decode_masks.visible. Each call writes its keys and values at
      decode_masks.slot and attends over the cache. So a prompt of n tokens
      is one call and each new token one more; the caller sizes the cache
      (a write past its end would be clamped to it).
    * cross-attention, with `decode=True`: the first call (with x_kv)
      caches the projected 'cached_key', 'cached_value' (`cache_layout`,
      kv_len long) and 'cached_kv_valid' [batch, kv_len]; later calls pass
      `kv_from_cache=True` and x_kv=None, so the encoder's keys and values
      are computed once.

  Attributes:
    num_heads: query heads.
    num_kv_heads: key/value heads (None: num_heads; 1: multi-query).
    head_dim: features per head (None: input features // num_heads).
    qkv_bias: biases on the query, key and value projections.
    dropout_rate: dropout on the attention weights; only the 'einsum' kernel
      applies it (the others raise when asked to in training).
    kernel: see `dot_product_attention`.
    chunk_size: keys per chunk of the 'chunked' kernel.
    use_rope: rotate queries and keys by their positions (RoPE).
    out_features: output features (None: those of x_q).
  """
  num_heads: int
  num_kv_heads: Optional[int] = None
  head_dim: Optional[int] = None
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  kernel: str = 'einsum'
  chunk_size: int = 128
  use_rope: bool = False
  out_features: Optional[int] = None

  @nn.compact
  def __call__(self, x_q, x_kv=None, *, mask=None, is_causal: bool = False,
               q_valid=None, kv_valid=None, train: bool, positions=None,
               kv_positions=None, decode: bool = False,
               decode_masks: Optional[DecodeMasks] = None,
               kv_from_cache: bool = False):
    """Attends from x_q to x_kv (to x_q itself when x_kv is None).

    Args:
      x_q: [batch, q_len, embed].
      x_kv: [batch, kv_len, embed_kv], or None for self-attention.
      mask, is_causal, q_valid, kv_valid: see `dot_product_attention`. In
        decode mode only kv_valid (cross-attention's first call) is read.
      train: enables dropout on the weights (needs the 'dropout' rng).
      positions: int [batch, q_len] or [q_len] for RoPE (default arange).
      kv_positions: the same for keys (default: `positions` in
        self-attention, arange(kv_len) in cross-attention).
      decode: decode-mode cross-attention (class doc).
      decode_masks: decode-mode self-attention (class doc).
      kv_from_cache: decode-mode cross-attention after the first call: use
        the keys, values and kv_valid cached by it; x_kv must be None.

    Returns:
      [batch, q_len, out_features]. With the 'einsum' kernel, and in decode
      mode, the weights [batch, heads, q_len, kv_len] are sown as
      ('intermediates', 'attention_weights').
    """
    if kv_from_cache and not (decode and x_kv is None):
      raise ValueError('kv_from_cache needs decode=True and x_kv=None')
    self_attention = x_kv is None and not kv_from_cache
    if decode and self_attention and decode_masks is None:
      raise ValueError('decode-mode self-attention needs decode_masks')
    features = x_q.shape[-1]
    head_dim = self.head_dim or features // self.num_heads
    kv_heads = self.num_kv_heads or self.num_heads

    def projection(heads, name, bias):
      return nn.DenseGeneral(
          (heads, head_dim), use_bias=bias, name=name,
          dot_general=dense.dot_general,
          kernel_init=axes.logical(nn.initializers.lecun_normal(),
                               ('embed', 'heads', 'kv')),
          bias_init=axes.logical(nn.initializers.zeros_init(), ('heads', 'kv')))

    q = projection(self.num_heads, 'query', self.qkv_bias)(x_q)
    if kv_from_cache:
      k, v, kv_valid = (self.get_variable('cache', name) for name in (
          'cached_key', 'cached_value', 'cached_kv_valid'))
      if k is None:
        raise ValueError('kv_from_cache: nothing cached; the first decode '
                         'call must pass x_kv')
    else:
      x_kv = x_q if self_attention else x_kv
      k = projection(kv_heads, 'key', self.qkv_bias)(x_kv)
      v = projection(kv_heads, 'value', self.qkv_bias)(x_kv)
    rope = None
    if self.use_rope:
      if positions is None:  # NumPy: a constant table (apply_rope).
        positions = np.arange(x_q.shape[1])
      if kv_positions is None and not kv_from_cache:
        kv_positions = positions if self_attention else np.arange(
            x_kv.shape[1])
      rope = (positions, kv_positions)

    if decode_masks is not None or decode:
      if rope is not None:
        q = positional.apply_rope(q, positions)
        if not kv_from_cache:  # Cached keys were rotated before caching.
          k = positional.apply_rope(k, kv_positions)
      if decode_masks is not None:
        out, weights = self._self_attend_with_cache(q, k, v, decode_masks)
      else:
        out, weights = self._cross_attend_with_cache(q, k, v, kv_valid,
                                                     kv_from_cache)
      self.sow('intermediates', 'attention_weights', weights)
      return self._output(out, features)

    dropout_rng = None
    if train and self.dropout_rate > 0.0:
      # Kernels other than 'einsum' reject this loudly rather than silently
      # training without the dropout the config asked for.
      dropout_rng = self.make_rng('dropout')
    result = dot_product_attention(
        q, k, v, mask=mask, is_causal=is_causal, q_valid=q_valid,
        kv_valid=kv_valid, kernel=self.kernel, chunk_size=self.chunk_size,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        return_weights=self.kernel == 'einsum', rope=rope)
    if self.kernel == 'einsum':
      out, weights = result
      # A no-op unless 'intermediates' is mutable, so training pays nothing.
      self.sow('intermediates', 'attention_weights', weights)
    else:
      out = result
    return self._output(out, features)

  def _output(self, out, features):
    """The 'out' projection: [batch, q_len, heads, head_dim] -> features."""
    return nn.DenseGeneral(
        self.out_features or features, axis=(-2, -1), name='out',
        dot_general=dense.dot_general,
        kernel_init=axes.logical(nn.initializers.lecun_normal(),
                             ('heads', 'kv', 'embed')),
        bias_init=axes.logical(nn.initializers.zeros_init(), ('embed',)))(out)

  def _self_attend_with_cache(self, q, k, v, masks: DecodeMasks):
    """Writes this call's k, v [batch, n, kv_heads, head_dim] into the cache
    at masks.slot, then attends over the cache."""
    k, v = cache_layout(k, v)
    n, cache_len = k.shape[3], masks.visible.shape[-1]
    if n > cache_len:
      raise ValueError(f'{n} tokens do not fit a decode cache of {cache_len}')
    cached_k = self.variable('cache', 'cached_key', jnp.zeros,
                             k.shape[:3] + (cache_len,), k.dtype)
    cached_v = self.variable('cache', 'cached_value', jnp.zeros,
                             v.shape[:2] + (cache_len,) + v.shape[3:], v.dtype)
    cached_k.value = lax.dynamic_update_slice_in_dim(
        cached_k.value, k, masks.slot, axis=3)
    cached_v.value = lax.dynamic_update_slice_in_dim(
        cached_v.value, v, masks.slot, axis=2)
    return cached_attention(q, cached_k.value, cached_v.value, masks.visible)

  def _cross_attend_with_cache(self, q, k, v, kv_valid, kv_from_cache):
    """Caches the encoder's keys and values on the first call; attends."""
    if not kv_from_cache:
      k, v = cache_layout(k, v)
      if kv_valid is None:
        kv_valid = jnp.ones(v.shape[:1] + v.shape[2:3], bool)
      for name, value in (('cached_key', k), ('cached_value', v),
                          ('cached_kv_valid', kv_valid)):
        self.put_variable('cache', name, value)
    visible = jnp.broadcast_to(kv_valid[:, None, :], (
        q.shape[0], q.shape[1], kv_valid.shape[1]))
    return cached_attention(q, k, v, visible)


SCORES = ('additive', 'dot')


class Seq2SeqAttention(nn.Module):
  """One head of attention from decoder states to encoder states (RNN seq2seq).

  The score of a decoder state s against an encoder state m is
    * 'additive' (Bahdanau et al. 2015): e = energy^T tanh(W_q s + W_m m + b),
      a one-hidden-layer network of width `features`;
    * 'dot' (Luong et al. 2015, their 'general' score): e = s^T (W m), a dot
      product after projecting m to the width of s (W lets the encoder and
      decoder widths differ; with W = I it is Luong's plain 'dot').
  The weights are the softmax of the scores over the valid encoder positions
  (sown as ('intermediates', 'attention_weights') [batch, tgt_len, src_len]);
  the output is the weighted sum of the encoder states. The projections are
  named ('embed', 'mlp'), like a feed-forward layer's first matmul (for
  'additive' they are the score network's hidden layer), so tensor
  parallelism splits their columns.

  Decoding: the first decode call (with memory) caches the projected keys
  W_m m + b, the memory and its validity in the 'cache' collection
  ('cached_keys', 'cached_memory', 'cached_memory_valid', all batch-first);
  later calls pass memory=None and reuse them, so the source is projected once.

  Attributes:
    score: 'additive' or 'dot'.
    features: width of the additive score's hidden layer (None: the decoder
      state's); 'dot' always projects to the decoder state's width.
  """
  score: str = 'additive'
  features: Optional[int] = None

  @nn.compact
  def __call__(self, queries, memory=None, *, memory_valid=None,
               decode: bool = False):
    """Attends from decoder states to encoder states.

    Args:
      queries: decoder states [batch, tgt_len, q_features].
      memory: encoder states [batch, src_len, m_features]; None only in
        decode calls after the first.
      memory_valid: bool [batch, src_len], False at source padding.
      decode: read and write the 'cache' collection (class doc).

    Returns:
      The attended encoder states [batch, tgt_len, m_features].
    """
    if self.score not in SCORES:
      raise ValueError(f'score={self.score!r}; use one of {SCORES}')
    additive = self.score == 'additive'
    width = (self.features or queries.shape[-1]) if additive else (
        queries.shape[-1])
    names = ('embed', 'mlp')
    if memory is None:
      if not decode:
        raise ValueError('Seq2SeqAttention needs memory (only decode calls '
                         'after the first may leave it out)')
      keys, memory, memory_valid = (
          self.get_variable('cache', name) for name in (
              'cached_keys', 'cached_memory', 'cached_memory_valid'))
      if keys is None:
        raise ValueError('nothing cached: the first decode call must pass '
                         'memory')
    else:
      keys = axes.dense(width, names, use_bias=additive, name='key')(memory)
      if memory_valid is None:
        memory_valid = jnp.ones(memory.shape[:2], bool)
      if decode:
        for name, value in (('cached_keys', keys), ('cached_memory', memory),
                            ('cached_memory_valid', memory_valid)):
          self.put_variable('cache', name, value)
    if additive:
      q = axes.dense(width, names, use_bias=False, name='query')(queries)
      energy = self.param(
          'energy', axes.logical(nn.initializers.normal(width ** -0.5),
                                 ('mlp',)), (width,))
      # [batch, tgt, src, width]: the price of the additive score, paid once
      # per (target, source) pair like the dot product's multiply-adds.
      scores = jnp.tanh(q[:, :, None, :] + keys[:, None, :, :]) @ energy
    else:
      scores = jnp.einsum('btd,bsd->bts', queries, keys)
    visible = memory_valid[:, None, :]
    weights = _masked_softmax(scores, visible, memory.dtype)
    self.sow('intermediates', 'attention_weights', weights)
    return jnp.einsum('bts,bsd->btd', weights, memory)
