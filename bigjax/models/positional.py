"""Positional information for Transformers: sinusoidal, learned and rotary.

Sinusoidal and learned encodings are added to the token embeddings; rotary
encodings (RoPE) rotate queries and keys inside attention, so that their dot
product depends only on the offset between the two positions.
"""

import flax.linen as nn
import jax.numpy as jnp

from bigjax.models import axes


def _inverse_timescales(num: int, max_timescale: float):
  """num frequencies 1 / max_timescale^(i / num), i = 0..num-1."""
  return max_timescale ** (-jnp.arange(num, dtype=jnp.float32) / num)


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
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f'RoPE needs an even head_dim, got {head_dim}')
  positions = jnp.asarray(positions, jnp.float32)
  if positions.ndim == 1:
    positions = positions[None]
  angles = positions[..., None] * _inverse_timescales(head_dim // 2,
                                                      max_timescale)
  sin = jnp.sin(angles)[:, :, None, :]  # [batch|1, length, 1, head_dim/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin],
                         axis=-1).astype(x.dtype)
