"""Speculative Jacobi Decoding (SJD, LOSSLESS) and Grouped Speculative Decoding (GSD, LOSSY).

SJD: the model drafts its own next window. Each sample keeps a window of L draft tokens for
the positions right after its committed prefix, with the distribution q each was drawn
from. One target pass feeds [last committed token, L drafts] at their slots and yields p_t
for every window position:
  * drafts are checked in order with the acceptance rule (exact: accept with
    min(1, p_t(x) / q(x)), q being p_{t-1}, the previous pass's distribution there); the
    prefix up to the first rejection is committed, plus one more token: drawn from the
    residual at the rejection, or from p_t after the window when every draft stood;
  * the positions after the rejection keep this pass's samples from p_t as their next
    drafts (q = p_t: the Jacobi iteration), and positions new to the window are
    initialised: uniformly at random (q uniform), or a copy of the left / upper neighbour
    (q = one-hot of the copied token, a function of tokens that are committed by the time
    the copy is checked).
Every draft is an independent draw from a q that is known and fixed by earlier tokens, so
the exact rule makes the output distribution the target's; at temperature 0 it is plain
AR decoding token for token.

GSD is SJD with grouped acceptance (acceptance.accept_grouped): a draft stands for the
mass of a cluster of similar tokens. LOSSY; with zero thresholds it is SJD, bit for bit.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import codebook
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib
from ssd_jax.decoding.keys import Stream

INITS = ('random', 'left', 'upper')


@dataclasses.dataclass(frozen=True)
class Options:
  window: int = registry.option(16, 'Draft window L after the committed prefix.')
  init: str = registry.option('random', 'How positions new to the window are drafted.',
                              choices=INITS)

  def validate(self, bundle):
    del bundle
    registry.check(self.window >= 1, 'window', self.window, 'must be >= 1.')
    registry.check(self.init in INITS, 'init', self.init, f'must be one of {", ".join(INITS)}.')


@dataclasses.dataclass(frozen=True)
class GroupedOptions(Options):
  rank_window: int = registry.option(7, 'Cluster candidates within +-this many ranks of p.')
  prob_threshold: float = registry.option(0.15, '... with |p(v) - p(x)| below this.')
  # Codes are unit vectors; on an earlier training of the fmnist tokenizer 0.05 kept ~12 of
  # 512 codes near each code, whose decoded patches differ by ~29 dB PSNR (the tokenizer's
  # own: 32 dB); the paper's 0.5 (on its model's token embeddings) admitted 30% of that
  # codebook, at ~16 dB.
  dist_threshold: float = registry.option(
      0.05, '... and squared unit-code distance below this.')

  def validate(self, bundle):
    super().validate(bundle)
    registry.check(self.rank_window >= 0, 'rank_window', self.rank_window,
                   'must be >= 0 (0 = no cluster: sjd).')
    registry.check(0 <= self.prob_threshold <= 1, 'prob_threshold', self.prob_threshold,
                   'must be in [0, 1] (0 = no cluster: sjd).')
    registry.check(0 <= self.dist_threshold <= 4, 'dist_threshold', self.dist_threshold,
                   'must be in [0, 4] (a squared distance between unit codes; 0 = no '
                   'cluster: sjd).')


def copy_source(pos, width, init):
  """Raster index a copy-initialised position copies: its left or upper neighbour (the
  other one on the first column / first row). pos >= 1."""
  left = jnp.where(pos % width > 0, pos - 1, pos - width)
  upper = jnp.where(pos >= width, pos - width, pos - 1)
  return left if init == 'left' else upper


def fill_window(target, init, keys, tokens, n, fresh, fresh_q, num_fresh):
  """Window for positions n .. n + L - 1: `fresh` [B, L] (drawn from `fresh_q` [B, L, V])
  where j < num_fresh [B], initialised drafts after that. tokens [B, N], committed [0, n).
  Returns (window [B, L], window_q [B, L, V])."""
  window_len = fresh.shape[1]
  vocab = target.model.vocab_size
  is_fresh = jnp.arange(window_len)[None] < num_fresh[:, None]          # [B, L]
  if init == 'random':
    drawn = jax.vmap(lambda k: jax.random.randint(k, (window_len,), 0, vocab))(keys)
    window = jnp.where(is_fresh, fresh, drawn.astype(jnp.int32))
    return window, jnp.where(is_fresh[..., None], fresh_q, 1.0 / vocab)
  # Copies chain (a copy of a copy of ...): follow each position's source pointer until it
  # reaches a committed token or a fresh draft, by pointer doubling: after t rounds every
  # pointer has moved 2^t links, so ceil(log2 L) + 1 rounds of one gather settle a window
  # of L (instead of L sequential scatters).
  pos = n[:, None] + jnp.arange(window_len)[None]                        # [B, L]
  src = copy_source(pos, target.model.grid[1], init)                     # [B, L] < pos
  ptr = jnp.where(is_fresh, pos, src)  # raster index; fresh drafts point at themselves
  for _ in range(max(1, window_len - 1).bit_length() + 1):
    inside = ptr >= n[:, None]                                           # a window position
    ptr = jnp.where(inside, state_lib.gather(ptr, ptr - n[:, None], axis=1), ptr)
  from_window = state_lib.gather(fresh, ptr - n[:, None], axis=1)
  window = jnp.where(ptr >= n[:, None], from_window, state_lib.gather(tokens, ptr, axis=1))
  return window, jnp.where(is_fresh[..., None], fresh_q,
                           jax.nn.one_hot(window, vocab, dtype=fresh_q.dtype))


def decode_sjd(target, params, labels, keys, window_len, init, rule=None):
  """labels [B], keys [B] -> (tokens [B, N], stats). params: the backbone's.

  rule(uniform [B, L], p, q [B, L, V], draft [B, L]) -> (accept [B, L], resample
  [B, L, V]); None = exact (state.accept_prefix).
  """
  b, n_tok = labels.shape[0], target.model.num_tokens
  vocab = target.model.vocab_size
  fill = functools.partial(fill_window, target, init)
  s = state_lib.start(target, params, labels, keys, extra_slots=window_len, keep_hidden=False)
  window, window_q = fill(keys_lib.pass_keys(keys, 0, Stream.WINDOW_FILL), s.tokens, s.length,
                          jnp.zeros((b, window_len), jnp.int32),
                          jnp.zeros((b, window_len, vocab), jnp.float32),
                          jnp.zeros((b,), jnp.int32))
  s = s.replace(extra=dict(window=window, window_q=window_q))
  steps = jnp.arange(window_len + 1)[None]                              # [1, L + 1]

  def body(s):
    n = s.length
    active = n < n_tok
    window, window_q = s.extra['window'], s.extra['window_q']
    block = jnp.concatenate([state_lib.last_token(s), window], axis=1)  # [B, L + 1]
    slots = target.prefix_len + n[:, None] - 1 + steps
    probs, _, cache = target.forward(params, block, slots, s.cache)     # [B, L + 1, V]
    valid = n[:, None] + steps[:, :window_len] < n_tok
    a, extra = state_lib.accept_prefix(target, keys, s, probs, window_q, window, valid, rule)
    new = state_lib.commit(target, s, window, a, extra, active, cache)
    # Next window: position n + a + 1 + j is output a + 1 + j of this pass while there is
    # one (L - a of them), then initialised positions.
    samples = target.sample(keys_lib.pass_keys(keys, s.passes, Stream.WINDOW_NEXT), probs)
    out = a[:, None] + 1 + steps[:, :window_len]                        # [B, L]
    window, window_q = fill(keys_lib.pass_keys(keys, s.passes, Stream.WINDOW_FILL),
                            new.tokens, new.length, state_lib.gather(samples, out, axis=1),
                            state_lib.gather(probs, out, axis=1), window_len - a)
    keep = active[:, None]
    new = new.replace(extra=dict(
        window=jnp.where(keep, window, s.extra['window']),
        window_q=jnp.where(keep[..., None], window_q, s.extra['window_q'])))
    return state_lib.count_pass(new, active)

  s = jax.lax.while_loop(state_lib.unfinished, body, s)
  return s.tokens, state_lib.stats(s, 0)


def build_sjd(bundle, target, options):
  del bundle
  return lambda params, labels, keys: decode_sjd(target, params['ar'], labels, keys,
                                                 options.window, options.init)


def build_gsd(bundle, target, options):
  rule = functools.partial(
      acceptance.accept_grouped, near=codebook.within(bundle, options.dist_threshold),
      rank_window=options.rank_window, prob_threshold=options.prob_threshold)
  return lambda params, labels, keys: decode_sjd(target, params['ar'], labels, keys,
                                                 options.window, options.init, rule)


METHODS = (
    registry.Method('sjd', 'speculative Jacobi decoding: the model drafts its next window '
                    '(lossless)', lossless=True, needs=(), options=Options, build=build_sjd,
                    block_tokens=lambda options, grid: options.window + 1),
    registry.Method('gsd', 'grouped speculative decoding: sjd accepting clusters of similar '
                    'tokens (LOSSY)', lossless=False, needs=('tokenizer',),
                    options=GroupedOptions, build=build_gsd,
                    block_tokens=lambda options, grid: options.window + 1),
)
