"""What the draft-and-verify methods share: the decode state, its start and its block commit.

Every method that keeps a committed prefix per sample (ar, speculative, ssd, sjd, gsd,
lantern, hawk) starts with `start` (prefill: one target pass, then token 0 drawn exactly)
and, where a pass accepts a prefix of drafts plus one more token, commits with `commit`.
Samples move at their own pace: `length` is per sample; finished samples idle (inactive)
until the loop ends.
"""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.models import transformer


@flax.struct.dataclass
class DecodeState:
  tokens: jax.Array           # [B, N] int32, -1 where not yet committed
  length: jax.Array           # [B] int32 committed tokens n; tokens [0, n) are final
  hidden: Optional[jax.Array]  # [G, B, N, D] h(i): the target state that predicted token i
                               # (None for methods that draft without it)
  cache: transformer.KVCache  # [G*B]; holds slots of tokens [0, n - 1) (+ prefix)
  passes: jax.Array           # [] int32 target forward passes so far
  sample_passes: jax.Array    # [B] int32 passes after which each sample was complete
  accepted: jax.Array         # [B] int32 drafted tokens accepted
  extra: Any = None           # a method's own fields (a dict of arrays)


def start(target, params, labels, keys, extra_slots=0, keep_hidden=True, extra=None):
  """Prefill (one target pass) and token 0 of every sample, drawn with its token key.

  `extra_slots`: cache room for blocks that run past the grid's end.
  """
  b, n = labels.shape[0], target.model.num_tokens
  probs, hidden, cache = target.prefill(params, labels, target.init_cache(b, extra_slots))
  first = target.sample(keys_lib.token_keys(keys, 0), probs)
  buf = None
  if keep_hidden:
    buf = jnp.zeros(hidden.shape[:2] + (n,) + hidden.shape[2:], hidden.dtype)
    buf = buf.at[:, :, 0].set(hidden)
  zero = jnp.zeros((b,), jnp.int32)
  return DecodeState(tokens=jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first),
                     length=jnp.ones((b,), jnp.int32), hidden=buf,
                     cache=target.commit(cache, jnp.full((b,), target.prefix_len)),
                     passes=jnp.int32(1), sample_passes=zero, accepted=zero, extra=extra)


def gather(x, idx, axis):
  """x [..., N, ...] along `axis` (the batch axis is axis - 1) at idx [B, K] -> [..., B, K, ...]."""
  idx = jnp.clip(idx, 0, x.shape[axis] - 1)
  shape = idx.shape + (1,) * (x.ndim - axis - 1)
  lead = (1,) * (axis - 1)
  return jnp.take_along_axis(x, idx.reshape(lead + shape), axis=axis)


def at_index(x, a):
  """x [B, K, ...] at a [B] -> [B, ...]."""
  return gather(x, a[:, None], axis=1)[:, 0]


def last_token(s):
  """[B, 1]: each sample's last committed token (the one the next block starts from)."""
  return gather(s.tokens, (s.length - 1)[:, None], axis=1)


def judge(target, keys, passes, stream, p, q, draft, rule=None):
  """Each draft [B, K] on its own: (accept [B, K], resample [B, K, V]) by `rule` (see
  acceptance.py; None = exact, the argmax match at temperature 0), its uniforms from
  `stream` of pass `passes` ([] or [B]); lossy rules get uniform = 0 at temperature 0."""
  if target.sampling.greedy and rule is None:
    return acceptance.accept_greedy(p, draft)
  u = keys_lib.uniforms(keys, passes, stream, draft.shape[1:], target.sampling.greedy)
  return (rule or acceptance.accept_exact)(u, p, q, draft)


def accept_prefix(target, keys, s, probs, q, draft, valid, rule):
  """Checks drafts [B, K] for positions n .. n+K-1 in order against probs [B, K + 1, V]
  (output j is p at position n + j) and draws the token that follows the kept prefix.

  rule(uniform, p, q, draft) -> (accept [B, K], resample [B, K, V]) (acceptance.py);
  None = exact (the argmax match at temperature 0). Returns (a [B] drafts kept, extra [B]
  the token at n + a: from the residual at a rejection, from p where there was no draft to
  accept, the bonus from p after the last draft when all K stood).
  """
  k = draft.shape[1]
  ok, resample = judge(target, keys, s.passes, keys_lib.Stream.ACCEPT, probs[:, :k], q,
                       draft, rule)
  a = acceptance.leading_accepted(ok & valid)                       # [B]
  rejected = (a < k) & at_index(valid, a)
  extra_probs = jnp.where(rejected[:, None], at_index(resample, a), at_index(probs, a))
  extra = target.sample(keys_lib.pass_keys(keys, s.passes, keys_lib.Stream.EXTRA),
                        extra_probs)
  return a, extra


def commit(target, s, drafts, a, extra, active, cache, hidden=None):
  """Commits drafts [B, K] at positions n .. n+a-1 and `extra` [B] at n + a (inside the
  grid) for active samples [B]; `hidden` [G, B, K + 1, D]: the states predicting them.
  `cache` holds the pass's keys/values; its committed length moves to the new prefix.
  """
  b, n_tok = s.tokens.shape
  n = s.length
  steps = jnp.arange(drafts.shape[1] + 1)[None]                     # [1, K + 1]
  new = jnp.concatenate([drafts, jnp.zeros((b, 1), jnp.int32)], axis=1)
  new = jnp.where(steps == a[:, None], extra[:, None], new)
  write = (steps <= a[:, None]) & (n[:, None] + steps < n_tok) & active[:, None]
  # Unwritten positions point past the end and are dropped (no duplicate indices).
  idx = jnp.where(write, n[:, None] + steps, n_tok)
  bidx = jnp.arange(b)[:, None]
  tokens = s.tokens.at[bidx, idx].set(new, mode='drop')
  hid = s.hidden
  if hidden is not None:
    hid = hid.at[:, bidx, idx].set(hidden, mode='drop')
  new_n = jnp.where(active, jnp.minimum(n + a + 1, n_tok), n)
  return s.replace(tokens=tokens, length=new_n, hidden=hid,
                   cache=target.commit(cache, target.prefix_len + new_n - 1),
                   accepted=s.accepted + jnp.where(active, a, 0))


def count_pass(s, active):
  """Advances the pass counter and stamps samples that just completed."""
  passes = s.passes + 1
  done = active & (s.length >= s.tokens.shape[1])
  return s.replace(passes=passes, sample_passes=jnp.where(done, passes, s.sample_passes))


def unfinished(s):
  return jnp.any(s.length < s.tokens.shape[1])


def stats(s, draft_passes, **more):
  """The stats every method reports (engine.generate sums and averages them)."""
  return dict({'target_passes': s.passes, 'draft_passes': jnp.asarray(draft_passes, jnp.int32),
               'sample_passes': s.sample_passes, 'accepted_drafts': s.accepted}, **more)
