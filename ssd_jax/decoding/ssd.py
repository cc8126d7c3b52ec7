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

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding import speculative


@flax.struct.dataclass
class RowState:
  spec: speculative.SpecState  # tokens, per-sample length, hidden, cache, counters
  row: jax.Array          # [B, W] current tokens of the row being decoded
  row_q: jax.Array        # [B, W, V] distribution each current row token was drawn from
  round: jax.Array        # [B] int32 passes spent on the current row
  row0_passes: jax.Array  # [B] int32 passes spent on row 0


def _pad(x, t, value=0):  # [B, T'] -> [B, t]
  return jnp.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=value)


def row_finish(target, keys, s, probs, hidden, rounds, active):
  """Applies one row pass (a verify round or the commit) to samples in the row phase.

  `s.spec.cache` already holds the pass's keys/values; probs [B, t, V], hidden [G, B, t, D].
  """
  sp = s.spec
  b, n_tok = sp.tokens.shape
  w = target.model.grid[1]
  greedy = target.sampling.greedy
  y = (sp.length - 1) // w                                          # [B]
  # Verify round: positions 1..W-1 against p from outputs 0..W-2.
  p = probs[:, :w - 1]
  drafted = s.row[:, 1:]
  if greedy:
    ok, resample = acceptance.accept_greedy(p, drafted)
  else:
    u = jax.vmap(lambda key: jax.random.uniform(key, (w - 1,)))(
        target_lib.sample_keys(keys, sp.passes, 4))
    ok, resample = acceptance.accept_exact(u, p, s.row_q[:, 1:], drafted)
  fixed = target_lib.sample_tokens(target_lib.sample_keys(keys, sp.passes, 5), resample,
                                   greedy)
  verified_row = s.row.at[:, 1:].set(jnp.where(ok, drafted, fixed))
  verified_q = s.row_q.at[:, 1:].set(p)
  # Commit pass: the row is final; store its hidden states and start the next row.
  row_start = y * w
  bidx = jnp.arange(b)[:, None]
  cols = jnp.arange(w)[None]
  tokens = sp.tokens.at[bidx, row_start[:, None] + cols].set(s.row, mode='drop')
  # Output j predicts position row_start + j + 1 (the last one: (y + 1, 0)).
  h_idx = jnp.where(row_start[:, None] + cols + 1 < n_tok, row_start[:, None] + cols + 1,
                    n_tok)
  hid = sp.hidden.at[:, bidx, h_idx].set(hidden[:, :, :w], mode='drop')
  nxt = target_lib.sample_tokens(target_lib.sample_keys(keys, sp.passes, 6),
                                 probs[:, w - 1], greedy)
  nxt_idx = jnp.where(row_start + w < n_tok, row_start + w, n_tok)
  tokens = tokens.at[jnp.arange(b), nxt_idx].set(nxt, mode='drop')
  committed = jnp.minimum(row_start + w + 1, n_tok)

  commit = active & (s.round >= rounds)
  verify = active & ~commit
  new_sp = sp.replace(
      tokens=jnp.where(commit[:, None], tokens, sp.tokens),
      hidden=jnp.where(commit[None, :, None, None], hid, sp.hidden),
      length=jnp.where(commit, committed, sp.length),
      cache=target.commit(sp.cache, jnp.where(commit, target.prefix_len + row_start + w,
                                              sp.cache.length[:b])))
  return s.replace(spec=new_sp,
                   row=jnp.where(verify[:, None], verified_row, s.row),
                   row_q=jnp.where(verify[:, None, None], verified_q, s.row_q),
                   round=jnp.where(commit, 0, jnp.where(verify, s.round + 1, s.round)))


def decode_ssd(target, drafter, params, labels, keys, k, rounds):
  """labels [B], keys [B] -> (tokens [B, N], stats). Row 0 drafts k tokens per pass."""
  h, w = target.model.grid
  n_tok = h * w
  t = max(k + 1, w)
  sp = speculative.init_state(target, params['backbone'], labels, keys, extra_slots=t)
  b = labels.shape[0]
  vocab = target.model.vocab_size
  s = RowState(spec=sp, row=jnp.zeros((b, w), jnp.int32),
               row_q=jnp.zeros((b, w, vocab), jnp.float32),
               round=jnp.zeros((b,), jnp.int32), row0_passes=jnp.zeros((b,), jnp.int32))
  row_limit = jnp.full((b,), w)

  def body(s):
    sp = s.spec
    active = sp.length < n_tok
    in_row0 = sp.length <= w  # token (1, 0) not sampled yet
    # Row-0 phase: a speculative block that stays inside row 0.
    block, slots, drafted = speculative.prepare_block(target, drafter, params, keys, sp, k,
                                                      row_limit)
    # Row phase: on a row's first pass, draft it whole with the vertical heads; token
    # (y, 0) is already committed (sampled exactly).
    y = (sp.length - 1) // w
    q_new = drafter.row(params, sp.tokens, sp.hidden, jnp.maximum(y, 1))
    d_new = target_lib.sample_tokens(target_lib.sample_keys(keys, sp.passes, 7), q_new,
                                     target.sampling.greedy)
    d_new = d_new.at[:, 0].set(jnp.take_along_axis(sp.tokens, (y * w)[:, None], 1)[:, 0])
    fresh = (s.round == 0)[:, None]
    s = s.replace(row=jnp.where(fresh, d_new, s.row),
                  row_q=jnp.where(fresh[..., None], q_new, s.row_q))
    # One target pass for both phases; blocks are contiguous and padded to t slots.
    tokens_in = jnp.where(in_row0[:, None], _pad(block, t), _pad(s.row, t))
    start = jnp.where(in_row0, slots[:, 0], target.prefix_len + y * w)
    slots_in = start[:, None] + jnp.arange(t)[None]
    probs, hidden, cache = target.forward(params['backbone'], tokens_in, slots_in, sp.cache)
    sp = speculative.finish_block(target, keys, sp, probs[:, :k + 1], hidden[:, :, :k + 1],
                                  cache, drafted, active & in_row0)
    s = row_finish(target, keys, s.replace(spec=sp), probs, hidden, rounds,
                   active & ~in_row0)
    return s.replace(spec=speculative.count_pass(s.spec, active, s.spec.length >= n_tok),
                     row0_passes=s.row0_passes + (active & in_row0))

  s = jax.lax.while_loop(lambda s: jnp.any(s.spec.length < n_tok), body, s)
  sp = s.spec
  stats = {'target_passes': sp.passes, 'draft_passes': sp.passes - 1,
           'sample_passes': sp.sample_passes, 'row0_passes': s.row0_passes}
  return sp.tokens, stats
