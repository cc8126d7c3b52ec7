"""Exact speculative decoding with neighbour-head drafts: LOSSLESS.

Each pass: draft k positions after every sample's committed prefix (heads in parallel;
chain heads one after another, each draft seeing the one before), verify [last committed
token, k drafts] as one block of k + 1 tokens in one target pass, keep the drafts up to
the first rejection, then one more token: the residual resample at the rejection, or the
bonus token from the last position when all k stand.

At temperature 0 the output equals plain AR decoding token for token; under sampling
its distribution equals the target's (both are tested).
"""

import jax
import jax.numpy as jnp

from ssd_jax.decoding import drafts
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib


def draft_block(target, drafter, params, keys, s, k, limit):
  """Drafts k tokens after each prefix (positions below `limit` [B]) -> (block [B, k + 1]:
  the last committed token then the drafts, slots [B, k + 1], (q [B, k, V], valid, draft))."""
  n = s.length
  q, valid, draft = drafter.block(params, s.tokens, s.hidden, n, k, keys_lib.pass_keys(
      keys, s.passes, keys_lib.Stream.DRAFT))                      # [B, k, V], [B, k] x 2
  valid = valid & (n[:, None] + jnp.arange(k)[None] < limit[:, None])
  block = jnp.concatenate([state_lib.last_token(s), draft], axis=1)
  slots = target.prefix_len + n[:, None] - 1 + jnp.arange(k + 1)[None]
  return block, slots, (q, valid, draft)


def accept_block(target, keys, s, probs, hidden, cache, drafted, active, rule=None):
  """Keeps the verified drafts of `draft_block` and commits them (inactive samples stay)."""
  q, valid, draft = drafted
  a, extra = state_lib.accept_prefix(target, keys, s, probs, q, draft, valid, rule)
  return state_lib.commit(target, s, draft, a, extra, active, cache, hidden)


def decode_speculative(target, drafter, params, labels, keys, k, rule=None):
  """labels [B], keys [B] -> (tokens [B, N], stats). params: {'ar', 'heads'}.

  rule: an acceptance rule replacing the exact one (LANTERN's relaxed acceptance).
  """
  n_tok = target.model.num_tokens
  s = state_lib.start(target, params['ar'], labels, keys, extra_slots=k + 1)
  limit = jnp.full(labels.shape, n_tok)

  def body(s):
    active = s.length < n_tok
    block, slots, drafted = draft_block(target, drafter, params, keys, s, k, limit)
    probs, hidden, cache = target.forward(params['ar'], block, slots, s.cache)
    s = accept_block(target, keys, s, probs, hidden, cache, drafted, active, rule)
    return state_lib.count_pass(s, active)

  s = jax.lax.while_loop(state_lib.unfinished, body, s)
  return s.tokens, state_lib.stats(s, s.passes - 1)


def build(bundle, target, options):
  drafter = drafts.head_drafter(bundle, target, options)
  return lambda params, labels, keys: decode_speculative(target, drafter, params, labels,
                                                         keys, options.draft_len)


METHODS = (registry.Method(
    'speculative', 'exact speculative decoding, neighbour-head drafts (lossless)',
    lossless=True, needs=('heads',), options=drafts.HeadOptions, build=build,
    block_tokens=lambda options, grid: options.draft_len + 1),)
