"""Positional information for Transformers: sinusoidal, learned and rotary.

Sinusoidal and learned encodings are added to the token embeddings; rotary
encodings (RoPE) rotate queries and keys inside attention, so that their dot
product depends only on the offset between the two positions.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bigjax.models import axes


def _inverse_timescales(num: int, max_timescale: float):
  """num frequencies 1 / max_timescale^(i / num), i = 0..num-1."""
  return (max_timescale ** (-np.arange(num, dtype=np.float32) / num)).astype(
      np.float32)


def sinusoidal_encoding(positions, dim: int, *, max_timescale: float = 1e4):
  """Vaswani et al. (2017) encodings, float32 [..., dim] for int [...].

  The first dim/2 features are sin(p * w_i), the last dim/2 cos(p * w_i),
  with w_i = max_timescale^(-i / (dim/2)) (the tensor2tensor layout: halves
  rather than interleaved; equivalent up to a fixed permutation of features).
  """
  if dim % 2:
    raise ValueError(f'sinusoidal encodings need an even dim, got {dim}')
  angles = (jnp.asarray(positions, jnp.float32)[..., None]
            * _inverse_timescales(dim // 2, max_timescale))
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def sinusoidal_encoding_2d(height: int, width: int, dim: int, *,
                           max_timescale: float = 1e4):
  """float32 [height * width, dim] for a row-major grid of patches.

  Half the features encode the row, half the column (as in MAE / ViT-style
  2-D sin-cos encodings), so neighbouring patches in either direction get
  similar codes.
  """
  if dim % 4:
    raise ValueError(f'2-D sinusoidal encodings need dim % 4 == 0, got {dim}')
  rows, cols = jnp.meshgrid(jnp.arange(height), jnp.arange(width),
                            indexing='ij')
  return jnp.concatenate([
      sinusoidal_encoding(rows.reshape(-1), dim // 2,
                          max_timescale=max_timescale),
      sinusoidal_encoding(cols.reshape(-1), dim // 2,
                          max_timescale=max_timescale)], axis=-1)


class LearnedPositionalEmbedding(nn.Module):
  """A trained vector per position: int [...] -> float32 [..., features].

  Attributes:
    max_len: number of positions (the table's rows).
    features: size of each vector.
  """
  max_len: int
  features: int

  @nn.compact
  def __call__(self, positions):
    table = self.param(
        'embedding',
        axes.logical(nn.initializers.normal(stddev=0.02), (None, 'embed')),
        (self.max_len, self.features))
    return jnp.take(table, positions, axis=0)


def apply_rope(x, positions, *, max_timescale: float = 1e4):
  """Rotary position embedding (Su et al., 2021) of queries or keys.

  Feature pairs (i, i + head_dim/2) are rotated by the angle p * w_i (the
  GPT-NeoX "rotate half" layout). A rotation by p_q on the query and p_k on
  the key leaves q.k depending on p_q - p_k only.

  Args:
    x: [batch, length, heads, head_dim], head_dim even.
    positions: int [batch, length] or [length].

  Returns:
    x rotated, same shape and dtype.
  """
  return rotate(x, *rope_tables(positions, x.shape[-1],
                                max_timescale=max_timescale))


def rope_tables(positions, head_dim: int, *, max_timescale: float = 1e4):
  """(cos, sin) of RoPE's angles, each [batch|1, length, 1, head_dim / 2],
  float32: what `rotate` turns x by.

  NumPy arrays (constants of the program) when `positions` are known while
  tracing (training's arange); computed in the program when they are traced
  (decoding). Computed in it, XLA fuses sin and cos into the rotation and
  evaluates them again for every head and batch row (on the CPU 2.4x the
  whole rotation's time in the benchmark GPT).
  """
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  xp = jnp if isinstance(positions, jax.core.Tracer) else np
  positions = xp.asarray(positions, xp.float32)
  if positions.ndim == 1:
    positions = positions[None]
  angles = positions[..., None] * xp.asarray(
      _inverse_timescales(head_dim // 2, max_timescale))
  return xp.cos(angles)[:, :, None, :], xp.sin(angles)[:, :, None, :]


def rotate(x, cos, sin):
  """x [batch, length, heads, head_dim] with its halves rotated by the
  angles of (cos, sin) [batch|1, length, 1, head_dim / 2]; x's dtype.
  `rotate(x, cos, -sin)` undoes `rotate(x, cos, sin)` (and is its
  transpose, the rotation being orthogonal)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)
