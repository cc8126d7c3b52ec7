"""Neighbour heads (SSD): predict the backbone's hidden state at a spatial neighbour.

From position (y, x), with z = [h(y, x); e(token(y, x))] where h(y, x) is the backbone's
final pre-norm hidden state that predicts token (y, x) and e its token embedding, the
horizontal head k predicts h(y, x + k) and the vertical head k predicts h(y + k, x):
f(z) = W0 z + SwiGLU(RMSNorm(W0 z)). Token logits come from the backbone's own final norm
and output layer, lm_head(final_norm(f(z))), so heads draft in hidden-state space.

With `context` = C > 0, each head also sees C committed positions next to what it
predicts, z = [h(y, x); e(y, x); h(c_1); e(c_1); ...; h(c_C); e(c_C)] (zeros where c_j is
off the grid), because images are correlated in 2D and the raster context alone misses it:
  * horizontal head k: c_j = (y - 1, x + k + j - 1), the row above from straight above its
    target rightwards;
  * vertical head k: c_j = (y, x + j), the upper-right context its target (y + k, x) saw.
The horizontal ones are committed whenever the head's source is; the vertical ones are
once the row above is (see decoding/drafts.py). `context_index` gives every c_j for every
source position, for training and decoding alike.
"""

import numpy as np

import flax.linen as nn
import jax.numpy as jnp

from ssd_jax.models import layers


def context_index(grid, num_horizontal, num_vertical, context):
  """-> (c [N, k_h + k_v, C] flat context positions of each head at each source position,
  valid [N, k_h + k_v, C]); c is clipped into the grid where not valid."""
  h, w = grid
  i = np.arange(h * w)[:, None, None]                              # [N, 1, 1]
  rows, cols = np.divmod(i, w)
  k = np.concatenate([np.arange(1, num_horizontal + 1),
                      np.zeros(num_vertical, int)])[None, :, None]  # [1, K, 1]
  j = np.arange(context)[None, None]                               # [1, 1, C]
  horizontal = np.arange(num_horizontal + num_vertical)[None, :, None] < num_horizontal
  # horizontal: (y - 1, x + k + j); vertical: (y, x + 1 + j).
  idx = np.where(horizontal, i - w + k + j, i + 1 + j)
  valid = np.where(horizontal, (rows >= 1) & (cols + k + j < w), cols + 1 + j < w)
  return np.clip(idx, 0, h * w - 1), valid


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
  context: int = 0         # committed positions next to its target each head also sees

  def setup(self):
    self.horizontal = [Head(self.dim, self.mlp_dim, name=f'horizontal_{k + 1}')
                       for k in range(self.num_horizontal)]
    self.vertical = [Head(self.dim, self.mlp_dim, name=f'vertical_{k + 1}')
                     for k in range(self.num_vertical)]

  def _z(self, hidden, token_emb, ctx_hidden, ctx_emb):  # ctx_* [..., C, D]
    parts = [hidden, token_emb]
    if self.context:
      if ctx_hidden is None or ctx_emb is None:
        raise ValueError(f'these heads were trained with context={self.context}: pass the '
                         'hidden states and token embeddings of their context positions.')
      for j in range(self.context):
        parts += [ctx_hidden[..., j, :], ctx_emb[..., j, :]]
    return jnp.concatenate(parts, -1)

  def __call__(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None):
    """hidden, token_emb [..., D] (ctx_* [..., k_h + k_v, C, D] with context, zeros where
    not valid) -> (horizontal [..., k_h, D], vertical [..., k_v, D])."""
    kh = self.num_horizontal
    split = lambda c: (None, None) if c is None else (c[..., :kh, :, :], c[..., kh:, :, :])
    (ch, cv), (eh, ev) = split(ctx_hidden), split(ctx_emb)
    return (self.all_horizontal(hidden, token_emb, ch, eh),
            self.all_vertical(hidden, token_emb, cv, ev))

  def all_horizontal(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None):
    """ctx_* [..., k_h, C, D]: head k's context is entry k - 1."""
    return self._stack(self.horizontal, hidden, token_emb, ctx_hidden, ctx_emb)

  def all_vertical(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None):
    """ctx_* [..., k_v, C, D]: head k's context is entry k - 1."""
    return self._stack(self.vertical, hidden, token_emb, ctx_hidden, ctx_emb)

  def _stack(self, heads, hidden, token_emb, ctx_hidden, ctx_emb):
    out = []
    for k, head in enumerate(heads):
      pick = lambda c, k=k: None if c is None else c[..., k, :, :]
      out.append(head(self._z(hidden, token_emb, pick(ctx_hidden), pick(ctx_emb))))
    return jnp.stack(out, axis=-2)

  def first_vertical(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None):
    """The (y+1, x) head alone, [..., D] (decoding uses no other vertical head); ctx_*
    [..., C, D] the states and embeddings at (y, x + 1), ..., (y, x + C)."""
    return self.vertical[0](self._z(hidden, token_emb, ctx_hidden, ctx_emb))
