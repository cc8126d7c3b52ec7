"""The SSD row schedule (Spatially Speculative Decoding): LOSSY.

Row 0 is decoded with exact speculative steps whose drafts stay inside row 0 (horizontal
heads). Every later row y is then handled in 1 + r target passes:
  * token (y, 0) is sampled exactly from p, which the pass that committed row y - 1
    produced; the vertical head drafts (y, 1..W-1) from row y - 1 (chain heads left to
    right from token (y, 0), each draft seeing the one before it);
  * r rounds, one pass each, feed the whole current row and check every position
    independently: accept with min(1, p/q), else resample from the residual; the corrected
    row is the next draft and this round's p is its q (as in Jacobi decoding);
  * one pass feeds the final row to commit it to the KV cache; it yields the exact hidden
    states the next row's vertical drafts need and p for token (y + 1, 0).
Positions are checked against p computed from a draft context, not the final one, so
the output distribution is not exactly the target's (this is what the paper trades);
with greedy decoding and r >= W - 1 the rounds converge and the result equals AR.
Sequential passes: 1 (prefill) + row-0 passes + (H - 1) * (1 + r), per sample. Row 0 is a
loop of (k + 1)-token passes in which each sample moves at its own pace; the rows after it
take exactly 1 + r passes each, so they run for all samples in step (a loop over rows, the
vertical heads drafting each row once).
"""

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.decoding import drafts
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib
from ssd_jax.decoding.keys import Stream
from ssd_jax.decoding.methods import speculative


@dataclasses.dataclass(frozen=True)
class Options(drafts.HeadOptions):
  rounds: int = registry.option(1, 'Verify-and-correct passes per row (r); W - 1 with '
                                'temperature 0 gives AR\'s tokens.')

  def validate(self, bundle):
    super().validate(bundle)
    registry.check(self.rounds >= 0, 'rounds', self.rounds, 'must be >= 0.')


def decode_row0(target, drafter, params, keys, s, k):
  """Row 0 and token (1, 0): exact speculative passes of k + 1 tokens whose drafts stay in
  row 0 (samples move at their own pace); s.extra['row0_passes'] counts each one's."""
  w = target.model.grid[1]
  limit = jnp.full(s.length.shape, w)

  def body(s):
    active = s.length <= w  # token (1, 0) not sampled yet
    block, slots, drafted = speculative.draft_block(target, drafter, params, keys, s, k, limit)
    probs, hidden, cache = target.forward(params['ar'], block, slots, s.cache)
    s = speculative.accept_block(target, keys, s, probs, hidden, cache, drafted, active)
    s = s.replace(extra=dict(s.extra, row0_passes=s.extra['row0_passes'] + active))
    return state_lib.count_pass(s, active)

  return jax.lax.while_loop(lambda s: jnp.any(s.length <= w), body, s)


def verify_round(target, keys, own, row, row_q, probs):
  """One verify round over the row [B, W] from this pass's p (probs [B, W, V]): positions
  1..W-1 against p from outputs 0..W-2, each accepted or resampled independently; the
  corrected row and its q (this p) are the next round's draft."""
  w = row.shape[1]
  p = probs[:, :w - 1]
  drafted = row[:, 1:]
  ok, resample = state_lib.judge(target, keys, own, Stream.ROW_ACCEPT, p, row_q[:, 1:],
                                 drafted)
  fixed = target.sample(keys_lib.pass_keys(keys, own, Stream.ROW_FIX), resample)
  return row.at[:, 1:].set(jnp.where(ok, drafted, fixed)), row_q.at[:, 1:].set(p)


def decode_rows(target, drafter, params, keys, s, rounds):
  """Rows 1..H-1, all samples in step: each row drafted once by the vertical head from the
  row above, `rounds` verify passes, one commit pass. Keys follow each sample's own pass
  count, so a sample's tokens do not depend on how long its neighbours took on row 0."""
  h, w = target.model.grid
  n_tok = h * w
  b = s.length.shape[0]
  cols = jnp.arange(w)[None]
  own = 1 + s.extra['row0_passes']                                  # [B] passes so far

  def row_body(y, carry):
    s, own = carry
    start = y * w
    slots = target.prefix_len + start + jnp.broadcast_to(cols, (b, w))
    q, row = drafter.row(params, s.tokens, s.hidden, jnp.full((b,), y),
                         keys_lib.pass_keys(keys, own, Stream.ROW_DRAFT))  # [B, W, V], [B, W]
    row = row.at[:, 0].set(jax.lax.dynamic_index_in_dim(s.tokens, start, 1, False))

    def round_body(_, carry):
      row, row_q, own = carry
      probs, _, _ = target.forward(params['ar'], row, slots, s.cache)  # nothing committed
      row, row_q = verify_round(target, keys, own, row, row_q, probs)
      return row, row_q, own + 1

    row, _, own = jax.lax.fori_loop(0, rounds, round_body, (row, q, own))
    # The commit pass: the row is final; its keys/values stay, its outputs are the hidden
    # states the next row is drafted from and p for token (y + 1, 0).
    probs, hidden, cache = target.forward(params['ar'], row, slots, s.cache)
    tokens = jax.lax.dynamic_update_slice_in_dim(s.tokens, row, start, axis=1)
    nxt = target.sample(keys_lib.pass_keys(keys, own, Stream.ROW_NEXT), probs[:, w - 1])
    # Output j predicts position start + j + 1 (past the grid for the last row: dropped).
    idx = jnp.broadcast_to(start + 1 + cols, (b, w))
    bidx = jnp.arange(b)[:, None]
    tokens = tokens.at[bidx[:, 0], start + w].set(nxt, mode='drop')
    done = jnp.minimum(start + w + 1, n_tok)
    s = s.replace(tokens=tokens, hidden=s.hidden.at[:, bidx, idx].set(hidden, mode='drop'),
                  length=jnp.full((b,), done), passes=s.passes + rounds + 1,
                  cache=target.commit(cache, jnp.full((b,), target.prefix_len + start + w)))
    return s, own + 1

  s, own = jax.lax.fori_loop(1, h, row_body, (s, own))
  return s.replace(sample_passes=own)


def decode_ssd(target, drafter, params, labels, keys, k, rounds):
  """labels [B], keys [B] -> (tokens [B, N], stats). Row 0 drafts k tokens per pass."""
  h, w = target.model.grid
  b = labels.shape[0]
  s = state_lib.start(target, params['ar'], labels, keys, extra_slots=max(k + 1, w),
                      extra={'row0_passes': jnp.zeros((b,), jnp.int32)})
  s = decode_row0(target, drafter, params, keys, s, k)
  if h > 1:
    s = decode_rows(target, drafter, params, keys, s, rounds)
  else:
    s = s.replace(sample_passes=1 + s.extra['row0_passes'])
  return s.tokens, state_lib.stats(s, s.passes - 1, row0_passes=s.extra['row0_passes'])


def build(bundle, target, options):
  drafter = drafts.head_drafter(bundle, target, options)
  return lambda params, labels, keys: decode_ssd(target, drafter, params, labels, keys,
                                                 options.draft_len, options.rounds)


METHODS = (registry.Method(
    'ssd', 'SSD row schedule: vertical row drafts, r verify rounds (LOSSY)', lossless=False,
    needs=('heads',), options=Options, build=build,
    block_tokens=lambda options, grid: max(options.draft_len + 1, grid[1])),)
