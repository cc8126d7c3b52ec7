"""Building blocks with logical axis names: dense layers, RMSNorm, SwiGLU, axial 2D RoPE.

RoPE comes in two pairings: ours rotates (x[:half], x[half:]); LlamaGen's (like Meta's
Llama) rotates adjacent pairs (x[2j], x[2j+1]). Both use the same 2D frequencies.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DEFAULT_INIT = nn.initializers.normal(0.02)


class Dense(nn.Module):
  """x @ W (+ b) with a kernel whose axes carry logical names, e.g. ('embed', 'mlp')."""
  features: int
  axes: Sequence[str]
  use_bias: bool = False
  kernel_init: nn.initializers.Initializer = DEFAULT_INIT

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.with_logical_partitioning(self.kernel_init, self.axes),
                        (x.shape[-1], self.features))
    y = x @ kernel
    if self.use_bias:
      y = y + self.param('bias', nn.with_logical_partitioning(
          nn.initializers.zeros, self.axes[1:]), (self.features,))
    return y


class RMSNorm(nn.Module):
  """Normalises in float32 whatever the activation dtype (as LlamaGen does)."""
  eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * scale


class SwiGLU(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):  # [..., D] -> [..., D]
    gate = Dense(self.hidden, ('embed', 'mlp'), name='gate')(x)
    up = Dense(self.hidden, ('embed', 'mlp'), name='up')(x)
    return Dense(x.shape[-1], ('mlp', 'embed'), name='down')(nn.silu(gate) * up)


def rope_angles(rows, cols, head_dim, base):
  """Axial 2D RoPE angles: half of the rotary pairs turn with the row, half with the column.

  rows, cols [B, T] (any ints; the condition prefix uses negative ones) -> [B, T, head_dim/2].
  """
  if head_dim % 4:
    raise ValueError(f'head_dim={head_dim} must be a multiple of 4 for axial 2D RoPE.')
  quarter = head_dim // 4
  freqs = base ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)  # [head_dim/4]
  row_angles = rows[..., None].astype(jnp.float32) * freqs
  col_angles = cols[..., None].astype(jnp.float32) * freqs
  return jnp.concatenate([row_angles, col_angles], axis=-1)


def apply_rope(x, angles, interleaved=False, keep=None):
  """Rotates pairs (x[..., :half], x[..., half:]), or (x[..., 2j], x[..., 2j+1]) when
  `interleaved`; x [..., H, Dh], angles [..., Dh/2] (e.g. [B, T, H, Dh] with [B, T, Dh/2];
  any leading shape, as Hawk's windows need).

  keep [...] bool: where False, cos = sin = 0, so x becomes exactly zero there (LlamaGen
  gives its class-token slot no rotation at all rather than the identity).
  """
  cos = jnp.cos(angles)[..., None, :]  # [..., 1, Dh/2]
  sin = jnp.sin(angles)[..., None, :]
  if keep is not None:
    cos = jnp.where(keep[..., None, None], cos, 0.0)
    sin = jnp.where(keep[..., None, None], sin, 0.0)
  # Angles stay float32 (bfloat16 would blur large positions); the result keeps x's dtype.
  if interleaved:
    pairs = x.reshape(x.shape[:-1] + (-1, 2))  # [..., H, Dh/2, 2]
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)
  else:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
  return out.astype(x.dtype)
