"""Exact speculative decoding with neighbour-head drafts: LOSSLESS.

Each pass: draft k positions after every sample's committed prefix (heads, in parallel),
verify [last committed token, k drafts] as one block of k + 1 tokens in one target pass,
keep the drafts up to the first rejection, then one more token: the residual resample at
the rejection, or the bonus token from the last position when all k stand. Samples move
at their own pace: `length` is per sample; finished samples idle until the loop ends.

At temperature 0 the output equals plain AR decoding token for token; under sampling
its distribution equals the target's (both are tested).
"""

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import drafts as drafts_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import transformer


@flax.struct.dataclass
class SpecState:
  tokens: jax.Array        # [B, N] int32, -1 where not yet committed
  length: jax.Array        # [B] int32 committed tokens n; tokens [0, n) are final
  hidden: jax.Array        # [G, B, N, D] h(i): the target state that predicted token i
  cache: transformer.KVCache  # [G*B]; holds slots of tokens [0, n - 1) (+ prefix)
  passes: jax.Array        # [] int32 target forward passes
  sample_passes: jax.Array  # [B] int32 passes after which each sample was complete
  accepted: jax.Array      # [B] int32 drafted tokens accepted


def init_state(target, params, labels, keys, extra_slots):
  """Prefill (one target pass) and sample token 0 for every sample."""
  b, n = labels.shape[0], target.model.num_tokens
  probs, hidden, cache = target.prefill(params, labels, target.init_cache(b, extra_slots))
  first = target_lib.sample_tokens(target_lib.sample_keys(keys, 0, 0), probs,
                                   target.sampling.greedy)
  tokens = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first)
  buf = jnp.zeros(hidden.shape[:2] + (n,) + hidden.shape[2:], hidden.dtype)
  return SpecState(tokens=tokens, length=jnp.ones((b,), jnp.int32),
                   hidden=buf.at[:, :, 0].set(hidden),
                   cache=target.commit(cache, jnp.full((b,), target.prefix_len)),
                   passes=jnp.int32(1), sample_passes=jnp.zeros((b,), jnp.int32),
                   accepted=jnp.zeros((b,), jnp.int32))


def prepare_block(target, drafter, params, keys, s, k, limit):
  """Drafts k tokens after each prefix (below `limit` [B]); returns what the pass needs."""
  n = s.length
  q, valid = drafter.block(params, s.tokens, s.hidden, n, k)       # [B, k, V], [B, k]
  valid = valid & (n[:, None] + jnp.arange(k)[None] < limit[:, None])
  draft = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 1), q,
                                   target.sampling.greedy)
  last_tok = drafts_lib.gather(s.tokens, (n - 1)[:, None], axis=1)  # [B, 1]
  block = jnp.concatenate([last_tok, draft], axis=1)                # [B, k + 1]
  slots = target.prefix_len + n[:, None] - 1 + jnp.arange(k + 1)[None]
  return block, slots, (q, valid, draft)


def finish_block(target, keys, s, probs, hidden, cache, drafted, active, rule=None):
  """Accepts the verified drafts of `prepare_block`; inactive samples stay unchanged.

  probs [B, k + 1, V], hidden [G, B, k + 1, D]: the pass's outputs at the block. `rule`
  (see acceptance.py; default: exact, or the argmax match at temperature 0) replaces the
  acceptance rule; at temperature 0 it is called with uniform = 0.
  """
  q, valid, draft = drafted
  b, n_tok = s.tokens.shape
  k = draft.shape[1]
  greedy = target.sampling.greedy
  n = s.length
  p = probs[:, :k]                                                   # p of each draft
  if greedy and rule is None:
    ok, resample = acceptance.accept_greedy(p, draft)
  else:
    u = jnp.zeros(draft.shape) if greedy else jax.vmap(
        lambda key: jax.random.uniform(key, (k,)))(target_lib.sample_keys(keys, s.passes, 2))
    ok, resample = (rule or acceptance.accept_exact)(u, p, q, draft)
  a = acceptance.leading_accepted(ok & valid)                       # [B]
  # One more token at n + a: from the residual where a draft was rejected, from p where
  # there was no draft to accept, from the bonus distribution when all k stood.
  at_a = lambda x: drafts_lib.gather(x, a[:, None], axis=1)[:, 0]
  rejected = (a < k) & at_a(valid)
  extra_probs = jnp.where(rejected[:, None], at_a(resample), at_a(probs))
  extra = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 3), extra_probs,
                                   greedy)
  # Commit drafts [n, n + a) and the extra token at n + a (when inside the grid).
  steps = jnp.arange(k + 1)[None]
  new_tokens = jnp.concatenate([draft, jnp.zeros((b, 1), jnp.int32)], axis=1)
  new_tokens = jnp.where(steps == a[:, None], extra[:, None], new_tokens)
  write = (steps <= a[:, None]) & (n[:, None] + steps < n_tok) & active[:, None]
  # Unwritten positions point past the end and are dropped (no duplicate indices).
  idx = jnp.where(write, n[:, None] + steps, n_tok)
  bidx = jnp.arange(b)[:, None]
  tokens = s.tokens.at[bidx, idx].set(new_tokens, mode='drop')
  hid = s.hidden.at[:, bidx, idx].set(hidden, mode='drop')
  new_n = jnp.where(active, jnp.minimum(n + a + 1, n_tok), n)
  return s.replace(tokens=tokens, length=new_n, hidden=hid,
                   cache=target.commit(cache, target.prefix_len + new_n - 1),
                   accepted=s.accepted + jnp.where(active, a, 0))


def count_pass(s, active, done):
  """Advances the pass counter and stamps samples that just completed."""
  passes = s.passes + 1
  return s.replace(passes=passes,
                   sample_passes=jnp.where(active & done, passes, s.sample_passes))


def decode_speculative(target, drafter, params, labels, keys, k, rule=None):
  """labels [B], keys [B] -> (tokens [B, N], stats). params: {'backbone', 'heads'}.

  rule: an acceptance rule replacing the exact one (LANTERN's relaxed acceptance).
  """
  n_tok = target.model.num_tokens
  s = init_state(target, params['backbone'], labels, keys, extra_slots=k + 1)
  limit = jnp.full(labels.shape, n_tok)

  def body(s):
    active = s.length < n_tok
    block, slots, drafted = prepare_block(target, drafter, params, keys, s, k, limit)
    probs, hidden, cache = target.forward(params['backbone'], block, slots, s.cache)
    s = finish_block(target, keys, s, probs, hidden, cache, drafted, active, rule)
    return count_pass(s, active, s.length >= n_tok)

  s = jax.lax.while_loop(lambda s: jnp.any(s.length < n_tok), body, s)
  stats = {'target_passes': s.passes, 'draft_passes': s.passes - 1,
           'sample_passes': s.sample_passes, 'accepted_drafts': s.accepted}
  return s.tokens, stats
