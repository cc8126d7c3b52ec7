"""Hawk draft model: a light drafter with 2D positions and local attention.

It drafts the target's hidden state at a grid position j = (r, c) from committed
neighbours, EAGLE-style: neighbour i enters as f_i = RMSNorm(W_in [h_i; e(t_i)]), where
h_i is the target's pre-norm state that predicted token i and e(t_i) the target's
embedding of token i (so f_i knows the tokens up to i). Two modes share the weights:
  horizontal, for (y, x+1), (y, x+2), ... as a chain: the query starts from the raster
    predecessor j - 1 and attends to the window: `window_rows` rows above, columns within
    +-window_cols, plus the window_cols positions left of j in its row;
  vertical, for (y+1, x): the query starts from j - W and attends to the rows above only,
    so a whole row is drafted at once from the finished row above (cached per row).
Queries and keys get axial 2D RoPE at their grid positions, so scores see 2D offsets. The
output is h_source + W_out(...): a predicted target hidden state, turned into tokens by the
target's own final norm and lm_head, so q is processed exactly like the target's p.

Training sees every position at once (dense attention under a window mask); decoding
gathers each query's window (`draft`); both compute the same function.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.models import layers


def window_offsets(window_rows, window_cols):
  """[K, 2] (dy, dx): the rows above (|dx| <= window_cols), then the left part of the row."""
  above = [(dy, dx) for dy in range(-window_rows, 0)
           for dx in range(-window_cols, window_cols + 1)]
  left = [(0, dx) for dx in range(-window_cols, 0)]
  return np.array(above + left, np.int32)


def window_positions(pos, grid, offsets, vertical):
  """pos [...] raster indices -> (idx [..., K] raster indices, clipped; valid [..., K])."""
  w = grid[1]
  rows = pos[..., None] // w + offsets[:, 0]
  cols = pos[..., None] % w + offsets[:, 1]
  valid = (rows >= 0) & (cols >= 0) & (cols < w)
  if vertical:
    valid = valid & (offsets[:, 0] < 0)
  return jnp.clip(rows * w + cols, 0, grid[0] * w - 1), valid


class WindowBlock(nn.Module):
  """Queries attend to their window (keys shared [..., K, E] or per query [..., Q, K, E])."""
  num_heads: int
  head_dim: int
  mlp_dim: int

  @nn.compact
  def __call__(self, x, q_angles, mem, k_angles, mask):
    """x [..., Q, E], mask [..., Q, K] -> [..., Q, E]."""
    h, dh = self.num_heads, self.head_dim
    y = layers.RMSNorm(name='attn_norm')(x)
    q = layers.Dense(h * dh, ('embed', 'heads'), name='query')(y)
    q = layers.apply_rope(q.reshape(q.shape[:-1] + (h, dh)), q_angles)
    kv = layers.Dense(2 * h * dh, ('embed', 'heads'), name='key_value')(mem)
    k, v = jnp.split(kv.reshape(kv.shape[:-1] + (2 * h, dh)), 2, axis=-2)
    k = layers.apply_rope(k, k_angles)
    keys = '...qkhd' if mem.ndim == x.ndim + 1 else '...khd'
    scores = jnp.einsum(f'...qhd,{keys}->...qhk', q, k) / np.sqrt(dh).astype(q.dtype)
    scores = jnp.where(mask[..., None, :], scores, jnp.finfo(scores.dtype).min)
    y = jnp.einsum(f'...qhk,{keys}->...qhd', jax.nn.softmax(scores, -1), v)
    x = x + layers.Dense(x.shape[-1], ('heads', 'embed'), name='out')(
        y.reshape(y.shape[:-2] + (h * dh,)))
    return x + layers.SwiGLU(self.mlp_dim, name='mlp')(layers.RMSNorm(name='mlp_norm')(x))


class HawkDrafter(nn.Module):
  dim: int                 # target width D: inputs and predicted hidden states
  grid: tuple              # (H, W) token grid
  width: int = 128         # drafter width E
  num_heads: int = 4
  mlp_dim: int = 256
  num_layers: int = 2
  window_rows: int = 2     # rows above each query in its window
  window_cols: int = 2     # columns either side (and to the left in its own row)
  rope_base: float = 100.0

  @property
  def offsets(self):
    return window_offsets(self.window_rows, self.window_cols)

  def setup(self):
    self.inp = layers.Dense(self.width, ('embed', 'embed_out'))
    self.inp_norm = layers.RMSNorm()
    self.directions = self.param(  # [horizontal; vertical] query embeddings
        'directions', nn.with_logical_partitioning(layers.DEFAULT_INIT, (None, 'embed')),
        (2, self.width))
    self.blocks = [WindowBlock(self.num_heads, self.width // self.num_heads, self.mlp_dim)
                   for _ in range(self.num_layers)]
    self.out_norm = layers.RMSNorm()
    self.out = layers.Dense(self.dim, ('embed_out', 'embed'))

  def features(self, hidden, emb):  # [..., D], emb broadcast to it -> [..., E]
    emb = jnp.broadcast_to(emb, hidden.shape)  # one embedding for both CFG groups
    return self.inp_norm(self.inp(jnp.concatenate([hidden, emb], -1)))

  def _angles(self, pos):
    w = self.grid[1]
    return layers.rope_angles(pos // w, pos % w, self.width // self.num_heads,
                              self.rope_base)

  def _run(self, src_hidden, src_feat, q_pos, vertical, mem, k_pos, mask):
    x = src_feat + self.directions[int(vertical)]
    q_angles, k_angles = self._angles(q_pos), self._angles(k_pos)
    for block in self.blocks:
      x = block(x, q_angles, mem, k_angles, mask)
    return src_hidden + self.out(self.out_norm(x))

  # --- decoding: a few queries, each with its gathered window ---------------------------
  def draft(self, src_hidden, src_emb, win_hidden, win_emb, pos, vertical):
    """Drafts at raster positions pos [B, Q] -> predicted hidden [..., B, Q, D].

    src_*: [..., B, Q, D] at the source (j - 1, or j - W when vertical); win_*:
    [..., B, Q, K, D] at window_positions(pos); invalid window entries are masked.
    """
    idx, valid = window_positions(pos, self.grid, self.offsets, vertical)
    return self._run(src_hidden, self.features(src_hidden, src_emb), pos, vertical,
                     self.features(win_hidden, win_emb), idx, valid)

  # --- training: every position of the grid at once --------------------------------------
  def _dense_mask(self, vertical):  # [N, N]: query j sees key i
    n = self.grid[0] * self.grid[1]
    idx, valid = window_positions(np.arange(n), self.grid, self.offsets, vertical)
    return jnp.any(jax.nn.one_hot(idx, n, dtype=bool) & valid[..., None], axis=-2)

  def vertical(self, hidden, emb):
    """hidden, emb [B, N, D] -> drafts [B, N, D] for every j from the rows above (row 0:
    meaningless)."""
    n, w = hidden.shape[-2], self.grid[1]
    pos = np.arange(n)
    src = np.maximum(pos - w, 0)
    feat = self.features(hidden, emb)
    return self._run(hidden[..., src, :], feat[..., src, :], pos, True, feat, pos,
                     self._dense_mask(True))

  def horizontal(self, hidden, emb, fed_hidden=None, fed_depth=None):
    """hidden, emb [B, N, D] -> drafts [B, N, D] for every j >= 1 from positions < j.

    With fed_hidden [B, N, D] and fed_depth [B, N]: the draft at j sees fed_hidden instead
    of hidden at the fed_depth[j] positions before it in its row (its source too when
    fed_depth >= 1), as at step fed_depth of a chain, where those are the drafter's own.
    """
    n, w = hidden.shape[-2], self.grid[1]
    pos = np.arange(n)
    src = np.maximum(pos - 1, 0)
    feat = self.features(hidden, emb)
    mask = self._dense_mask(False)
    if fed_hidden is None:
      return self._run(hidden[..., src, :], feat[..., src, :], pos, False, feat, pos, mask)
    fed_feat = self.features(fed_hidden, emb)
    lag = pos[:, None] - pos[None, :]                                     # [N, N] j - i
    fed = (pos[:, None] // w == pos[None, :] // w) & (lag >= 1) & (
        lag <= fed_depth[..., None])                                      # [B, N, N]
    # Keys twice over, [true; fed]: each (query, key) pair sees exactly one version.
    mem = jnp.concatenate([feat, fed_feat], -2)                           # [B, 2N, E]
    both = jnp.concatenate([mask & ~fed, mask & fed], -1)                 # [B, N, 2N]
    use_fed = (fed_depth >= 1)[..., None]
    src_hidden = jnp.where(use_fed, fed_hidden[..., src, :], hidden[..., src, :])
    src_feat = jnp.where(use_fed, fed_feat[..., src, :], feat[..., src, :])
    return self._run(src_hidden, src_feat, pos, False, mem, np.concatenate([pos, pos]), both)

  def __call__(self, hidden, emb):
    """Teacher-forced drafts of both modes: hidden, emb [B, N, D] -> ([B, N, D], [B, N, D])."""
    return self.horizontal(hidden, emb), self.vertical(hidden, emb)
