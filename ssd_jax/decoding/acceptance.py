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


def accept_multi(uniform, p, drafts, qs, present):
  """Recursive rejection sampling over C candidates for one position.

  uniform [B, C] in [0, 1); p [B, V] target; drafts [B, C] tokens, candidate c drawn
  from qs[:, c] [B, V] independently; present [B, C]. -> (choice [B]: the accepted
  candidate or -1, r [B, V]: the distribution to draw from when none stood).
  """
  r, choice = p, jnp.full(drafts.shape[:1], -1)
  for c in range(drafts.shape[1]):
    x, q = drafts[:, c], qs[:, c]
    test = present[:, c] & (choice < 0)
    rx = jnp.take_along_axis(r, x[:, None], -1)[:, 0]
    qx = jnp.take_along_axis(q, x[:, None], -1)[:, 0]
    ok = test & (uniform[:, c] * qx < rx)
    choice = jnp.where(ok, c, choice)
    r = jnp.where((test & ~ok)[:, None], residual(r, q), r)
  return choice, r


def leading_accepted(accept):
  """Number of accepted positions before the first rejection: [B, K] bool -> [B] int32."""
  return jnp.sum(jnp.cumprod(accept.astype(jnp.int32), axis=-1), axis=-1)


# --- lossy rules: accept a draft for the mass of tokens that would look the same ---------
#
# Both rules below keep the draft token itself when they accept and fall back to the exact
# residual normalize(max(0, p - q)) when they reject, as the published code does; only the
# acceptance probability is relaxed. With temperature 0 call them with uniform = 0: a
# one-hot p then accepts exactly what the relaxed mass allows (for the exact rule, the
# argmax match).


def accept_grouped(uniform, p, q, draft, near, rank_window, prob_threshold):
  """GSD grouped acceptance: accept with min(1, p(C) / q(C)) over a dynamic cluster C.

  C holds the draft x and every token v within `rank_window` places of x in the target's
  ranking (tokens sorted by p, ties by id) with |p(v) - p(x)| < prob_threshold whose code
  is near x's: near [V, m] lists, for each code, the other codes within the squared
  distance threshold (-1 pads; see codebook.within). Only those m candidates are ranked
  (rank = how many tokens come before), so no pass sorts the vocabulary. An empty
  neighbourhood or a zero threshold leaves C = {x}: the exact rule, bit for bit. LOSSY
  otherwise: the kept token is not distributed as p.
  """
  cand = near[draft]                                                   # [B, K, m]
  valid = cand >= 0
  cand = jnp.maximum(cand, 0)
  p_x = _token_prob(p, draft)                                          # [B, K]
  p_c = jnp.take_along_axis(p, cand, -1)                               # [B, K, m]
  q_c = jnp.take_along_axis(q, cand, -1)
  ids = jnp.arange(p.shape[-1])

  def rank(pv, v):  # [B, K, C] probabilities and ids -> their places in the ranking
    before = (p[..., None, :] > pv[..., None]) | (
        (p[..., None, :] == pv[..., None]) & (ids < v[..., None]))
    return jnp.sum(before, -1)

  rank_c = rank(p_c, cand)
  rank_x = rank(p_x[..., None], draft[..., None])
  member = (valid & (jnp.abs(rank_c - rank_x) <= rank_window)
            & (jnp.abs(p_c - p_x[..., None]) < prob_threshold))
  p_group = p_x + jnp.sum(jnp.where(member, p_c, 0.0), -1)
  q_group = _token_prob(q, draft) + jnp.sum(jnp.where(member, q_c, 0.0), -1)
  return uniform * q_group < p_group, residual(p, q)


def latent_neighbours(codes, k):
  """codes [V, d] -> [V, k] int32: each code's k nearest other codes, nearest first."""
  sq = jnp.sum(codes ** 2, -1)
  dist = sq[:, None] + sq[None, :] - 2.0 * codes @ codes.T
  dist = jnp.where(jnp.eye(codes.shape[0], dtype=bool), jnp.inf, dist)
  return jax.lax.top_k(-dist, k)[1].astype(jnp.int32)


def accept_relaxed(uniform, p, q, draft, neighbours, delta):
  """LANTERN relaxed acceptance: accept with min(1, (p(x) + pooled) / q(x)).

  `pooled` is the target mass of x's latent neighbours (neighbours [V, k], nearest first),
  taken in order while the running total stays <= delta: the longest such prefix, which
  bounds the total variation the relaxation may add by delta. delta = 0 pools nothing:
  the exact rule, bit for bit. LOSSY for delta > 0.
  """
  mass = jnp.cumsum(jnp.take_along_axis(p, neighbours[draft], -1), -1)  # [B, K, k]
  pooled = jnp.max(jnp.where(mass <= delta, mass, 0.0), -1)
  return uniform * _token_prob(q, draft) < _token_prob(p, draft) + pooled, residual(p, q)
