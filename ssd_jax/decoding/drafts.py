"""Draft source: the SSD neighbour heads, queried from committed positions.

h(i) below is the target's hidden state that predicted token i (kept per committed
position in the decode state). A draft for position j comes either from the horizontal
head d = j - (n - 1) at the last committed position n - 1 (same row only), or from the
vertical head 1 at the position straight above, j - W (when that one is committed).
Heads with context C also get the states and embeddings of C committed positions next to
their target (models/heads.py): (y - 1, x + k ...) for horizontal head k, (y, x + 1 ...)
for the vertical head; a vertical draft whose context is not all committed is not made.
Chain heads also get the token left of their target: the draft made just before (or the
committed token), so they draft one position at a time. Draft distributions go through
the target's own CFG and sampling processing.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.decoding import keys as keys_lib
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

  def _apply(self, params, method, hidden, emb, ctx=(), left=None):
    """hidden [G, B, ..., D], emb and left (the chain's token left of the target) [B, ...,
    D], ctx () or (hidden, emb) of the context."""
    emb = jnp.broadcast_to(emb, hidden.shape)
    ctx = (ctx[0], jnp.broadcast_to(ctx[1], ctx[0].shape)) if ctx else (None, None)
    if left is not None:
      left = jnp.broadcast_to(left, hidden.shape)
    return self.heads.apply({'params': params['heads']}, hidden, emb, *ctx, left_emb=left,
                            method=method)

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

  def block(self, params, tokens, hidden, n, k, keys):
    """Drafts for positions n .. n+k-1 of each sample.

    tokens [B, N], hidden [G, B, N, D], n [B] committed counts (>= 1), keys [B] of this
    pass's draft stream -> (q [B, k, V], valid [B, k], draft [B, k] drawn from q): valid is
    False where no head reaches the position. Chain heads draft one position at a time,
    each from the draft before it (position j with fold_in(keys, j)).
    """
    grid_w = self.target.model.grid[1]
    num_tokens = tokens.shape[1]
    last = n - 1                                                  # [B]
    pos = n[:, None] + jnp.arange(k)[None]                        # [B, k]
    dist = jnp.arange(1, k + 1)[None]                             # [1, k]
    kh = self.heads.num_horizontal
    c = jnp.arange(self.heads.context)[None, None]                  # [1, 1, C]
    # Horizontal: head d at the last committed position, context from the row above.
    last_token = gather(tokens, last[:, None], axis=1)[:, 0]     # [B]
    src_h = gather(hidden, last[:, None], axis=2)[:, :, 0]        # [G, B, D]
    emb_h = self._emb(params, last_token)
    ahead = jnp.arange(1, kh + 1)[None, :, None] + c                # [1, kh, C] k + j
    above_h = last[:, None, None] - grid_w + ahead                  # [B, kh, C] row above
    ctx_ok = (last[:, None, None] >= grid_w) & ((last % grid_w)[:, None, None] + ahead < grid_w)
    ctx_h = self._context(params, tokens, hidden, above_h, ctx_ok)
    hor_ok = (dist <= kh) & ((last % grid_w)[:, None] + dist < grid_w)
    # Vertical: head 1 at the position above each drafted one.
    above = pos - grid_w
    src_v = gather(hidden, above, axis=2)                         # [G, B, k, D]
    emb_v = self._emb(params, gather(tokens, above, axis=1))
    right = (above % grid_w)[..., None] + 1 + c < grid_w          # [B, k, C] on the grid
    ctx_v = self._context(params, tokens, hidden, above[..., None] + 1 + c, right)
    # The source must be committed, and with context the positions right of it too.
    ver_ok = (above >= 0) & (above + jnp.sum(right, -1) <= last[:, None])
    use_h = hor_ok & ((dist <= self.horizontal_first) | ~ver_ok)
    valid = (hor_ok | ver_ok) & (pos < num_tokens)
    if not self.heads.chain:
      hor = self._apply(params, self.heads.all_horizontal, src_h, emb_h, ctx_h)  # [G, B, kh, D]
      hor = gather(hor, jnp.broadcast_to(jnp.minimum(dist, kh) - 1, pos.shape), axis=2)
      ver = self._apply(params, self.heads.first_vertical, src_v, emb_v, ctx_v)
      pred = jnp.where(use_h[None, ..., None], hor, ver)          # [G, B, k, D]
      q = self.target.draft_probs(params['ar'], pred)
      return q, valid, self.target.sample(keys, q)
    # Chain: position j's left neighbour is draft j - 1 (the last committed token for j = 0;
    # nothing for a vertical draft in column 0).
    prev = last_token
    pick = lambda ctx, i: tuple(x[..., i, :, :] for x in ctx)     # entry i of a context
    qs, drafts = [], []
    for j in range(k):  # k is small and static: unrolled
      left = self._emb(params, prev) * (pos[:, j] % grid_w > 0)[:, None]  # [B, D]
      pred = self._apply(params, self.heads.first_vertical, src_v[:, :, j], emb_v[:, j],
                         pick(ctx_v, j), left=left)
      if j < kh:
        one = lambda heads, *a, d=j + 1, **kw: heads.one_horizontal(d, *a, **kw)
        hor = self._apply(params, one, src_h, emb_h, pick(ctx_h, j), left=left)
        pred = jnp.where(use_h[None, :, j, None], hor, pred)      # [G, B, D]
      q = self.target.draft_probs(params['ar'], pred)             # [B, V]
      prev = self.target.sample(keys_lib.fold(keys, j), q)
      qs.append(q)
      drafts.append(prev)
    return jnp.stack(qs, 1), valid, jnp.stack(drafts, 1)

  def row(self, params, tokens, hidden, y, keys):
    """Vertical-head drafts for the whole row y [B] from row y - 1, keys [B] of the row's
    draft stream -> (q [B, W, V], row [B, W] drawn from q). Token (y, 0) is committed
    already, so column 0 is the caller's: chain heads draft columns 1.. left to right from
    it (column x with fold_in(keys, x); their q[:, 0] is zero and row[:, 0] that token)."""
    grid_w = self.target.model.grid[1]
    above = (y - 1)[:, None] * grid_w + jnp.arange(grid_w)[None]  # [B, W]
    src = gather(hidden, above, axis=2)
    emb = self._emb(params, gather(tokens, above, axis=1))
    ahead = 1 + jnp.arange(self.heads.context)                    # [C]
    on_grid = jnp.arange(grid_w)[:, None] + ahead < grid_w        # [W, C]
    ctx = self._context(params, tokens, hidden, above[..., None] + ahead,
                        jnp.broadcast_to(on_grid, above.shape + ahead.shape))
    if not self.heads.chain:
      ver = self._apply(params, self.heads.first_vertical, src, emb, ctx)
      q = self.target.draft_probs(params['ar'], ver)
      return q, self.target.sample(keys, q)
    # A scan over columns 1.. (the row may be long): the column axis leads.
    cols = lambda x, axis: jnp.moveaxis(x, axis, 0)[1:]
    xs = (cols(src, 2), cols(emb, 1), tuple(cols(x, x.ndim - 3) for x in ctx),
          jnp.arange(1, grid_w))
    first = gather(tokens, y[:, None] * grid_w, axis=1)[:, 0]     # [B] token (y, 0)

    def step(prev, x):
      src_x, emb_x, ctx_x, col = x
      q = self.target.draft_probs(params['ar'], self._apply(
          params, self.heads.first_vertical, src_x, emb_x, ctx_x,
          left=self._emb(params, prev)))                          # [B, V]
      tok = self.target.sample(keys_lib.fold(keys, col), q)
      return tok, (q, tok)

    # Unrolled: each step is a few tiny kernels, and XLA:CPU's per-iteration overhead made
    # a rolled scan cost ~0.14 ms per column at batch 1 (SSD r = 1: +40% per pass).
    _, (q, row) = jax.lax.scan(step, first, xs, unroll=True)    # [W - 1, B, ...]
    q = jnp.concatenate([jnp.zeros_like(q[:1]), q], 0)
    row = jnp.concatenate([first[None], row], 0)
    return jnp.moveaxis(q, 0, 1), jnp.moveaxis(row, 0, 1)
