"""The SSD row schedule (Spatially Speculative Decoding): LOSSY.

Row 0 is decoded with exact speculative steps whose drafts stay inside row 0 (horizontal
heads). Every later row y is then handled in 1 + r target passes:
  * token (y, 0) is sampled exactly from p, which the pass that committed row y - 1
    produced; the vertical heads draft (y, 1..W-1) at once from row y - 1;
  * r rounds, one pass each, feed the whole current row and check every position
    independently: accept with min(1, p/q), else resample from the residual; the corrected
    row is the next draft and this round's p is its q (as in Jacobi decoding);
  * one pass feeds the final row to commit it to the KV cache; it yields the exact hidden
    states the next row's vertical drafts need and p for token (y + 1, 0).
Positions are checked against p computed from a draft context, not the final one, so
the output distribution is not exactly the target's (this is what the paper trades);
with greedy decoding and r >= W - 1 the rounds converge and the result equals AR.
Sequential passes: 1 (prefill) + row-0 passes + (H - 1) * (1 + r), per sample.
"""

import dataclasses

import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
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


def _pad(x, t):  # [B, T'] -> [B, t]
  return jnp.pad(x, ((0, 0), (0, t - x.shape[1])))


def row_finish(target, keys, s, probs, hidden, rounds, active):
  """Applies one row pass (a verify round or the commit) to samples in the row phase.

  `s.cache` already holds the pass's keys/values; probs [B, t, V], hidden [G, B, t, D].
  s.extra: row [B, W] current tokens of the row being decoded, row_q [B, W, V] the
  distribution each was drawn from, round [B] passes spent on the row so far.
  """
  row, row_q, round_ = s.extra['row'], s.extra['row_q'], s.extra['round']
  b, n_tok = s.tokens.shape
  w = target.model.grid[1]
  y = (s.length - 1) // w                                          # [B]
  # Verify round: positions 1..W-1 against p from outputs 0..W-2.
  p = probs[:, :w - 1]
  drafted = row[:, 1:]
  if target.sampling.greedy:
    ok, resample = acceptance.accept_greedy(p, drafted)
  else:
    u = keys_lib.uniforms(keys, s.passes, Stream.ROW_ACCEPT, (w - 1,), False)
    ok, resample = acceptance.accept_exact(u, p, row_q[:, 1:], drafted)
  fixed = target.sample(keys_lib.pass_keys(keys, s.passes, Stream.ROW_FIX), resample)
  verified_row = row.at[:, 1:].set(jnp.where(ok, drafted, fixed))
  verified_q = row_q.at[:, 1:].set(p)
  # Commit pass: the row is final; store its hidden states and start the next row.
  row_start = y * w
  bidx = jnp.arange(b)[:, None]
  cols = jnp.arange(w)[None]
  tokens = s.tokens.at[bidx, row_start[:, None] + cols].set(row, mode='drop')
  # Output j predicts position row_start + j + 1 (the last one: (y + 1, 0)).
  h_idx = jnp.where(row_start[:, None] + cols + 1 < n_tok, row_start[:, None] + cols + 1,
                    n_tok)
  hid = s.hidden.at[:, bidx, h_idx].set(hidden[:, :, :w], mode='drop')
  nxt = target.sample(keys_lib.pass_keys(keys, s.passes, Stream.ROW_NEXT), probs[:, w - 1])
  nxt_idx = jnp.where(row_start + w < n_tok, row_start + w, n_tok)
  tokens = tokens.at[jnp.arange(b), nxt_idx].set(nxt, mode='drop')
  committed = jnp.minimum(row_start + w + 1, n_tok)

  commit = active & (round_ >= rounds)
  verify = active & ~commit
  return s.replace(
      tokens=jnp.where(commit[:, None], tokens, s.tokens),
      hidden=jnp.where(commit[None, :, None, None], hid, s.hidden),
      length=jnp.where(commit, committed, s.length),
      cache=target.commit(s.cache, jnp.where(commit, target.prefix_len + row_start + w,
                                             s.cache.length[:b])),
      extra=dict(s.extra, row=jnp.where(verify[:, None], verified_row, row),
                 row_q=jnp.where(verify[:, None, None], verified_q, row_q),
                 round=jnp.where(commit, 0, jnp.where(verify, round_ + 1, round_))))


def decode_ssd(target, drafter, params, labels, keys, k, rounds):
  """labels [B], keys [B] -> (tokens [B, N], stats). Row 0 drafts k tokens per pass."""
  h, w = target.model.grid
  n_tok = h * w
  t = max(k + 1, w)
  b = labels.shape[0]
  extra = dict(row=jnp.zeros((b, w), jnp.int32),
               row_q=jnp.zeros((b, w, target.model.vocab_size), jnp.float32),
               round=jnp.zeros((b,), jnp.int32), row0_passes=jnp.zeros((b,), jnp.int32))
  s = state_lib.start(target, params['ar'], labels, keys, extra_slots=t, extra=extra)
  row_limit = jnp.full((b,), w)

  def body(s):
    active = s.length < n_tok
    in_row0 = s.length <= w  # token (1, 0) not sampled yet
    # Row-0 phase: a speculative block that stays inside row 0.
    block, slots, drafted = speculative.draft_block(target, drafter, params, keys, s, k,
                                                    row_limit)
    # Row phase: on a row's first pass, draft it whole with the vertical heads; token
    # (y, 0) is already committed (sampled exactly).
    y = (s.length - 1) // w
    q_new = drafter.row(params, s.tokens, s.hidden, jnp.maximum(y, 1))
    d_new = target.sample(keys_lib.pass_keys(keys, s.passes, Stream.ROW_DRAFT), q_new)
    d_new = d_new.at[:, 0].set(jnp.take_along_axis(s.tokens, (y * w)[:, None], 1)[:, 0])
    fresh = (s.extra['round'] == 0)[:, None]
    row = jnp.where(fresh, d_new, s.extra['row'])
    s = s.replace(extra=dict(s.extra, row=row,
                             row_q=jnp.where(fresh[..., None], q_new, s.extra['row_q'])))
    # One target pass for both phases; blocks are contiguous and padded to t slots.
    tokens_in = jnp.where(in_row0[:, None], _pad(block, t), _pad(row, t))
    start = jnp.where(in_row0, slots[:, 0], target.prefix_len + y * w)
    slots_in = start[:, None] + jnp.arange(t)[None]
    probs, hidden, cache = target.forward(params['ar'], tokens_in, slots_in, s.cache)
    s = speculative.accept_block(target, keys, s, probs[:, :k + 1], hidden[:, :, :k + 1],
                                 cache, drafted, active & in_row0)
    s = row_finish(target, keys, s, probs, hidden, rounds, active & ~in_row0)
    s = s.replace(extra=dict(s.extra, row0_passes=s.extra['row0_passes'] + (active & in_row0)))
    return state_lib.count_pass(s, active)

  s = jax.lax.while_loop(state_lib.unfinished, body, s)
  return s.tokens, state_lib.stats(s, s.passes - 1, row0_passes=s.extra['row0_passes'])


def build(bundle, target, options):
  drafter = drafts.head_drafter(bundle, target, options)
  return lambda params, labels, keys: decode_ssd(target, drafter, params, labels, keys,
                                                 options.draft_len, options.rounds)


METHODS = (registry.Method(
    'ssd', 'SSD row schedule: vertical row drafts, r verify rounds (LOSSY)', lossless=False,
    needs=('heads',), options=Options, build=build,
    block_tokens=lambda options, grid: max(options.draft_len + 1, grid[1])),)
