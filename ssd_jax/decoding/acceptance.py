"""Acceptance rules: small pure functions every schedule shares.

A rule looks at each drafted position independently and returns
  accept    [B, K] bool  : whether the draft token stands,
  resample  [B, K, V]    : the distribution to draw a replacement from where it does not.
Schedules decide what to do with the decisions (keep the prefix up to the first rejection,
or correct every position as the SSD row schedule does). New rules (grouped acceptance,
relaxed acceptance) plug in here without touching the loops.
"""

import jax
import jax.numpy as jnp


def _token_prob(probs, tokens):  # [B, K, V], [B, K] -> [B, K]
  return jnp.take_along_axis(probs, tokens[..., None], -1)[..., 0]


def residual(p, q):
  """normalize(max(0, p - q)); where that is empty (p <= q everywhere) fall back to p."""
  r = jnp.maximum(p - q, 0.0)
  total = jnp.sum(r, -1, keepdims=True)
  return jnp.where(total > 1e-12, r / jnp.maximum(total, 1e-30), p)


def accept_exact(uniform, p, q, draft):
  """Speculative sampling: accept with min(1, p(x)/q(x)), else draw from the residual.

  uniform [B, K] in [0, 1); p, q [B, K, V] the target's and the drafter's (identically
  processed) distributions; draft [B, K] tokens drawn from q. Exact: the kept or
  replacement token is distributed as p.
  """
  px, qx = _token_prob(p, draft), _token_prob(q, draft)
  accept = uniform * qx < px  # u < p/q without dividing by a possibly tiny q
  return accept, residual(p, q)


def accept_greedy(p, draft):
  """Temperature 0: a draft stands iff it is the target's argmax; otherwise the argmax."""
  best = jnp.argmax(p, -1)
  return draft == best, jax.nn.one_hot(best, p.shape[-1], dtype=p.dtype)


def leading_accepted(accept):
  """Number of accepted positions before the first rejection: [B, K] bool -> [B] int32."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)
