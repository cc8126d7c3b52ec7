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

With `chain`, each head whose target's left neighbour is not its own source (horizontal
k >= 2: (y, x + k - 1); vertical k: (y + k, x - 1)) also sees that token's embedding
(zeros at the left edge), z = [...; e(left)]. Training feeds the data token there; decoding
feeds the draft made just before (or the committed token), so drafts form a chain, as an
AR drafter's do, and each is judged by a target that conditions on the same token. The
vertical head gains most: without it, the state it predicts has seen row y + 1 left of x,
which nothing it sees holds. `left_index` gives the positions.
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


def left_index(grid, num_horizontal, num_vertical):
  """-> (left [N, k_h + k_v] flat position left of each head's target, valid [N, K]); False
  where the target is off the grid or in column 0, and for horizontal head 1 (its left
  neighbour is its source)."""
  h, w = grid
  i = np.arange(h * w)[:, None]                                    # [N, 1]
  rows, cols = np.divmod(i, w)
  kh = np.arange(1, num_horizontal + 1)[None]                      # [1, k_h]
  kv = np.arange(1, num_vertical + 1)[None]                        # [1, k_v]
  left = np.concatenate([i + kh - 1, i + kv * w - 1], 1)
  valid = np.concatenate([(kh >= 2) & (cols + kh < w),
                          (rows + kv < h) & (cols >= 1)], 1)
  return np.clip(left, 0, h * w - 1), valid


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
  chain: bool = False      # heads also see the token left of their target (see above)

  def setup(self):
    self.horizontal = [Head(self.dim, self.mlp_dim, name=f'horizontal_{k + 1}')
                       for k in range(self.num_horizontal)]
    self.vertical = [Head(self.dim, self.mlp_dim, name=f'vertical_{k + 1}')
                     for k in range(self.num_vertical)]

  def chained(self, k, vertical):
    """Whether head k (1-based) of its kind takes the token left of its target."""
    return self.chain and (vertical or k >= 2)

  def _z(self, hidden, token_emb, ctx_hidden, ctx_emb, left_emb=None, chained=False):
    """ctx_* [..., C, D]; left_emb [..., D] where `chained`."""
    parts = [hidden, token_emb]
    if self.context:
      if ctx_hidden is None or ctx_emb is None:
        raise ValueError(f'these heads were trained with context={self.context}: pass the '
                         'hidden states and token embeddings of their context positions.')
      for j in range(self.context):
        parts += [ctx_hidden[..., j, :], ctx_emb[..., j, :]]
    if chained:
      if left_emb is None:
        raise ValueError('these heads were trained with chain=True: pass the embedding of '
                         'the token left of each target.')
      parts.append(left_emb)
    return jnp.concatenate(parts, -1)

  def __call__(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None, left_emb=None):
    """hidden, token_emb [..., D] (ctx_* [..., k_h + k_v, C, D] with context, zeros where
    not valid; left_emb [..., k_h + k_v, D] with chain) -> (horizontal [..., k_h, D],
    vertical [..., k_v, D])."""
    kh = self.num_horizontal
    split = lambda c: (None, None) if c is None else (c[..., :kh, :, :], c[..., kh:, :, :])
    (ch, cv), (eh, ev) = split(ctx_hidden), split(ctx_emb)
    lh, lv = (None, None) if left_emb is None else (left_emb[..., :kh, :], left_emb[..., kh:, :])
    return (self.all_horizontal(hidden, token_emb, ch, eh, lh),
            self.all_vertical(hidden, token_emb, cv, ev, lv))

  def all_horizontal(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None, left_emb=None):
    """ctx_* [..., k_h, C, D], left_emb [..., k_h, D]: head k's are entry k - 1."""
    return self._stack(self.horizontal, False, hidden, token_emb, ctx_hidden, ctx_emb,
                       left_emb)

  def all_vertical(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None, left_emb=None):
    """ctx_* [..., k_v, C, D], left_emb [..., k_v, D]: head k's are entry k - 1."""
    return self._stack(self.vertical, True, hidden, token_emb, ctx_hidden, ctx_emb, left_emb)

  def _stack(self, heads, vertical, hidden, token_emb, ctx_hidden, ctx_emb, left_emb):
    out = []
    for k, head in enumerate(heads):
      pick = lambda c, k=k: None if c is None else c[..., k, :, :]
      left = None if left_emb is None else left_emb[..., k, :]
      out.append(head(self._z(hidden, token_emb, pick(ctx_hidden), pick(ctx_emb), left,
                              self.chained(k + 1, vertical))))
    return jnp.stack(out, axis=-2)

  def one_horizontal(self, d, hidden, token_emb, ctx_hidden=None, ctx_emb=None,
                     left_emb=None):
    """Horizontal head d (1-based, static) alone, [..., D]; ctx_* [..., C, D], left_emb
    [..., D] the token at (y, x + d - 1) with chain."""
    return self.horizontal[d - 1](self._z(hidden, token_emb, ctx_hidden, ctx_emb, left_emb,
                                          self.chained(d, False)))

  def first_vertical(self, hidden, token_emb, ctx_hidden=None, ctx_emb=None, left_emb=None):
    """The (y+1, x) head alone, [..., D] (decoding uses no other vertical head); ctx_*
    [..., C, D] the states and embeddings at (y, x + 1), ..., (y, x + C); left_emb [..., D]
    the token at (y + 1, x - 1) with chain."""
    return self.vertical[0](self._z(hidden, token_emb, ctx_hidden, ctx_emb, left_emb,
                                    self.chained(1, True)))
