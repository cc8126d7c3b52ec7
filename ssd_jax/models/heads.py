"""Neighbour heads (SSD): predict the backbone's hidden state at a spatial neighbour.

From position (y, x), with z = [h(y, x); e(token(y, x))] where h(y, x) is the backbone's
final pre-norm hidden state that predicts token (y, x) and e its token embedding, the
horizontal head k predicts h(y, x + k) and the vertical head k predicts h(y + k, x):
f(z) = W0 z + SwiGLU(RMSNorm(W0 z)). Token logits come from the backbone's own final norm
and output layer, lm_head(final_norm(f(z))), so heads draft in hidden-state space.
"""

import flax.linen as nn
import jax.numpy as jnp

from ssd_jax.models import layers


class Head(nn.Module):
  dim: int
  mlp_dim: int

  @nn.compact
  def __call__(self, z):  # [..., 2D] -> [..., D]
    u = layers.Dense(self.dim, ('embed', 'embed_out'), name='w0')(z)
    return u + layers.SwiGLU(self.mlp_dim, name='mlp')(layers.RMSNorm(name='norm')(u))


class NeighbourHeads(nn.Module):
  num_horizontal: int = 3  # heads for (y, x+1), ..., (y, x+num_horizontal)
  num_vertical: int = 1    # heads for (y+1, x), ..., (y+num_vertical, x)
  dim: int = 192           # backbone width
  mlp_dim: int = 256

  def setup(self):
    self.horizontal = [Head(self.dim, self.mlp_dim, name=f'horizontal_{k + 1}')
                       for k in range(self.num_horizontal)]
    self.vertical = [Head(self.dim, self.mlp_dim, name=f'vertical_{k + 1}')
                     for k in range(self.num_vertical)]

  def __call__(self, hidden, token_emb):
    """hidden, token_emb [..., D] -> (horizontal [..., k_h, D], vertical [..., k_v, D])."""
    return self.all_horizontal(hidden, token_emb), self.all_vertical(hidden, token_emb)

  def all_horizontal(self, hidden, token_emb):
    z = jnp.concatenate([hidden, token_emb], -1)
    return jnp.stack([head(z) for head in self.horizontal], axis=-2)

  def all_vertical(self, hidden, token_emb):
    z = jnp.concatenate([hidden, token_emb], -1)
    return jnp.stack([head(z) for head in self.vertical], axis=-2)

  def first_vertical(self, hidden, token_emb):
    """The (y+1, x) head alone, [..., D] (decoding uses no other vertical head)."""
    return self.vertical[0](jnp.concatenate([hidden, token_emb], -1))
