"""Draft source: the SSD neighbour heads, queried from committed positions.

h(i) below is the target's hidden state that predicted token i (kept per committed
position in the decode state). A draft for position j comes either from the horizontal
head d = j - (n - 1) at the last committed position n - 1 (same row only), or from the
vertical head 1 at the position straight above, j - W (when that one is committed).
Heads with context C also get the states and embeddings of C committed positions next to
their target (models/heads.py): (y - 1, x + k ...) for horizontal head k, (y, x + 1 ...)
for the vertical head; a vertical draft whose context is not all committed is not made.
Draft distributions go through the target's own CFG and sampling processing.
"""

import dataclasses

import jax.numpy as jnp

from ssd_jax.decoding import registry
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.state import gather
from ssd_jax.models import heads as heads_lib


@dataclasses.dataclass(frozen=True)
class HeadOptions:
  """Knobs of the methods that draft with the neighbour heads."""
  draft_len: int = registry.option(4, 'Drafts verified per pass.')
  horizontal_first: int = registry.option(
      0, 'Drafts from the horizontal heads before the vertical one takes over (0 = from '
      'the heads\' measured acceptance).')

  def validate(self, bundle):
    del bundle
    registry.check(self.draft_len >= 1, 'draft_len', self.draft_len, 'must be >= 1.')
    registry.check(self.horizontal_first >= 0, 'horizontal_first', self.horizontal_first,
                   "must be >= 0 (0 = choose from the heads' measured acceptance).")


def horizontal_first_auto(bundle):
  """Horizontal offsets whose measured acceptance beats the vertical head's (at least 1)."""
  stage = bundle.stage('heads')
  results = (stage.results if stage else None) or {}
  vertical = results.get('vertical_1', {}).get('acceptance')
  if vertical is None:
    return 1
  count = 0
  for d in range(1, stage.module.num_horizontal + 1):
    if results.get(f'horizontal_{d}', {}).get('acceptance', 0.0) < vertical:
      break
    count = d
  return max(count, 1)


def head_drafter(bundle, target, options):
  first = options.horizontal_first or horizontal_first_auto(bundle)
  return HeadDrafter(target, bundle.stage('heads').module, first)


@dataclasses.dataclass(frozen=True)
class HeadDrafter:
  target: target_lib.Target
  heads: heads_lib.NeighbourHeads
  # Offsets 1..horizontal_first after the last committed token use the horizontal heads,
  # the rest the vertical head (pick it from the heads' measured acceptance).
  horizontal_first: int = 1

  def _emb(self, params, tokens):
    return self.target.embed(params['ar'], jnp.maximum(tokens, 0))

  def _apply(self, params, method, hidden, emb, ctx=()):
    """hidden [G, B, ..., D], emb [B, ..., D], ctx () or (hidden, emb) of the context."""
    emb = jnp.broadcast_to(emb, hidden.shape)
    if ctx:
      ctx = (ctx[0], jnp.broadcast_to(ctx[1], ctx[0].shape))
    return self.heads.apply({'params': params['heads']}, hidden, emb, *ctx, method=method)

  def _context(self, params, tokens, hidden, idx, ok):
    """Context (hidden [G, B, K, C, D], emb [B, K, C, D]) at positions idx [B, K, C], zero
    where not ok [B, K, C]; () for heads without context."""
    if not self.heads.context:
      return ()
    b = idx.shape[0]
    mask = ok[..., None].astype(hidden.dtype)
    flat = idx.reshape(b, -1)
    ctx_h = gather(hidden, flat, axis=2).reshape(hidden.shape[:2] + idx.shape[1:] + (-1,))
    ctx_e = self._emb(params, gather(tokens, flat, axis=1)).reshape(idx.shape + (-1,))
    return ctx_h * mask, ctx_e * mask

  def block(self, params, tokens, hidden, n, k):
    """Drafts for positions n .. n+k-1 of each sample.

    tokens [B, N], hidden [G, B, N, D], n [B] committed counts (>= 1) ->
    (q [B, k, V], valid [B, k]): valid is False where no head reaches the position.
    """
    grid_w = self.target.model.grid[1]
    num_tokens = tokens.shape[1]
    last = n - 1                                                  # [B]
    pos = n[:, None] + jnp.arange(k)[None]                        # [B, k]
    dist = jnp.arange(1, k + 1)[None]                             # [1, k]
    # Horizontal: all k_h heads at the last committed position.
    src_h = gather(hidden, last[:, None], axis=2)[:, :, 0]        # [G, B, D]
    emb_h = self._emb(params, gather(tokens, last[:, None], axis=1)[:, 0])
    kh = self.heads.num_horizontal
    c = jnp.arange(self.heads.context)[None, None]                  # [1, 1, C]
    ahead = jnp.arange(1, kh + 1)[None, :, None] + c                # [1, kh, C] k + j
    above_h = last[:, None, None] - grid_w + ahead                  # [B, kh, C] row above
    ctx_ok = (last[:, None, None] >= grid_w) & ((last % grid_w)[:, None, None] + ahead < grid_w)
    ctx_h = self._context(params, tokens, hidden, above_h, ctx_ok)
    hor = self._apply(params, self.heads.all_horizontal, src_h, emb_h, ctx_h)  # [G, B, kh, D]
    hor = gather(hor, jnp.broadcast_to(jnp.minimum(dist, kh) - 1, pos.shape), axis=2)
    hor_ok = (dist <= kh) & ((last % grid_w)[:, None] + dist < grid_w)
    # Vertical: head 1 at the position above each drafted one.
    above = pos - grid_w
    src_v = gather(hidden, above, axis=2)                         # [G, B, k, D]
    emb_v = self._emb(params, gather(tokens, above, axis=1))
    right = (above % grid_w)[..., None] + 1 + c < grid_w          # [B, k, C] on the grid
    ctx_v = self._context(params, tokens, hidden, above[..., None] + 1 + c, right)
    ver = self._apply(params, self.heads.first_vertical, src_v, emb_v, ctx_v)
    # The source must be committed, and with context the positions right of it too.
    ver_ok = (above >= 0) & (above + jnp.sum(right, -1) <= last[:, None])
    use_h = hor_ok & ((dist <= self.horizontal_first) | ~ver_ok)
    pred = jnp.where(use_h[None, ..., None], hor, ver)            # [G, B, k, D]
    valid = (hor_ok | ver_ok) & (pos < num_tokens)
    return self.target.draft_probs(params['ar'], pred), valid

  def row(self, params, tokens, hidden, y):
    """Vertical-head drafts for the whole row y [B] from row y - 1: q [B, W, V]."""
    grid_w = self.target.model.grid[1]
    above = (y - 1)[:, None] * grid_w + jnp.arange(grid_w)[None]  # [B, W]
    src = gather(hidden, above, axis=2)
    emb = self._emb(params, gather(tokens, above, axis=1))
    ahead = 1 + jnp.arange(self.heads.context)                    # [C]
    on_grid = jnp.arange(grid_w)[:, None] + ahead < grid_w        # [W, C]
    ctx = self._context(params, tokens, hidden, above[..., None] + ahead,
                        jnp.broadcast_to(on_grid, above.shape + ahead.shape))
    ver = self._apply(params, self.heads.first_vertical, src, emb, ctx)
    return self.target.draft_probs(params['ar'], ver)
