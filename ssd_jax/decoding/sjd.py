"""Speculative Jacobi Decoding (SJD): the model drafts its own next window. LOSSLESS.

Each sample keeps a window of L draft tokens for the positions right after its committed
prefix, with the distribution q each was drawn from. One target pass feeds
[last committed token, L drafts] at their slots and yields p_t for every window position:
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
AR decoding token for token. A lossy rule (GSD's grouped acceptance) plugs in as `rule`.
"""

import functools

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import drafts as drafts_lib
from ssd_jax.decoding import speculative
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import transformer

INITS = ('random', 'left', 'upper')


@flax.struct.dataclass
class JacobiState:
  tokens: jax.Array         # [B, N] int32, -1 where not yet committed
  length: jax.Array         # [B] int32 committed tokens n; tokens [0, n) are final
  window: jax.Array         # [B, L] int32 drafts for positions n .. n + L - 1
  window_q: jax.Array       # [B, L, V] the distribution each draft was drawn from
  cache: transformer.KVCache  # [G*B]; holds slots of tokens [0, n - 1) (+ prefix)
  passes: jax.Array         # [] int32 target forward passes
  sample_passes: jax.Array  # [B] int32 passes after which each sample was complete
  accepted: jax.Array       # [B] int32 drafted tokens accepted


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
  b, window_len = fresh.shape
  vocab = target.model.vocab_size
  is_fresh = jnp.arange(window_len)[None] < num_fresh[:, None]          # [B, L]
  if init == 'random':
    drawn = jax.vmap(lambda k: jax.random.randint(k, (window_len,), 0, vocab))(keys)
    window = jnp.where(is_fresh, fresh, drawn.astype(jnp.int32))
    return window, jnp.where(is_fresh[..., None], fresh_q, 1.0 / vocab)
  # Copies can chain (a copy of a copy), so fill the window left to right on a canvas
  # that holds the committed tokens followed by room for the window.
  pos = n[:, None] + jnp.arange(window_len)[None]                        # [B, L]
  bidx = jnp.arange(b)
  canvas = jnp.concatenate([tokens, jnp.zeros((b, window_len), jnp.int32)], axis=1)

  def place(j, canvas):
    src = copy_source(pos[:, j], target.model.grid[1], init)
    tok = jnp.where(is_fresh[:, j], fresh[:, j], canvas[bidx, src])
    return canvas.at[bidx, pos[:, j]].set(tok)

  canvas = jax.lax.fori_loop(0, window_len, place, canvas)
  window = jnp.take_along_axis(canvas, pos, axis=1)
  return window, jnp.where(is_fresh[..., None], fresh_q,
                           jax.nn.one_hot(window, vocab, dtype=fresh_q.dtype))


def decode_sjd(target, params, labels, keys, window_len, init,
               rule=acceptance.accept_exact):
  """labels [B], keys [B] -> (tokens [B, N], stats). params: the backbone's.

  rule(uniform [B, L], p, q [B, L, V], draft [B, L]) -> (accept [B, L], resample
  [B, L, V]); at temperature 0 it is called with uniform = 0 (the exact rule is then the
  argmax match).
  """
  if init not in INITS:
    raise ValueError(f'--sjd_init={init!r} must be one of {", ".join(INITS)}.')
  b, n_tok = labels.shape[0], target.model.num_tokens
  vocab = target.model.vocab_size
  greedy = target.sampling.greedy
  fill = functools.partial(fill_window, target, init)
  probs, _, cache = target.prefill(params, labels,
                                   target.init_cache(b, extra_slots=window_len))
  first = target_lib.sample_tokens(target_lib.sample_keys(keys, 0, 0), probs, greedy)
  tokens = jnp.full((b, n_tok), -1, jnp.int32).at[:, 0].set(first)
  length = jnp.ones((b,), jnp.int32)
  window, window_q = fill(target_lib.sample_keys(keys, 0, 1), tokens, length,
                          jnp.zeros((b, window_len), jnp.int32),
                          jnp.zeros((b, window_len, vocab), jnp.float32),
                          jnp.zeros((b,), jnp.int32))
  s = JacobiState(tokens=tokens, length=length, window=window, window_q=window_q,
                  cache=target.commit(cache, jnp.full((b,), target.prefix_len)),
                  passes=jnp.int32(1), sample_passes=jnp.zeros((b,), jnp.int32),
                  accepted=jnp.zeros((b,), jnp.int32))
  steps = jnp.arange(window_len + 1)[None]                              # [1, L + 1]
  bidx = jnp.arange(b)[:, None]

  def body(s):
    n = s.length
    active = n < n_tok
    last_tok = drafts_lib.gather(s.tokens, (n - 1)[:, None], axis=1)   # [B, 1]
    block = jnp.concatenate([last_tok, s.window], axis=1)             # [B, L + 1]
    slots = target.prefix_len + n[:, None] - 1 + steps
    probs, _, cache = target.forward(params, block, slots, s.cache)    # [B, L + 1, V]
    if greedy:
      u = jnp.zeros((b, window_len))
    else:
      u = jax.vmap(lambda key: jax.random.uniform(key, (window_len,)))(
          target_lib.sample_keys(keys, s.passes, 2))
    ok, resample = rule(u, probs[:, :window_len], s.window_q, s.window)
    valid = n[:, None] + steps[:, :window_len] < n_tok
    a = acceptance.leading_accepted(ok & valid)                         # [B]
    at_a = lambda x: drafts_lib.gather(x, a[:, None], axis=1)[:, 0]
    rejected = (a < window_len) & at_a(valid)
    extra_probs = jnp.where(rejected[:, None], at_a(resample), at_a(probs))
    extra = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 3), extra_probs,
                                     greedy)
    # Commit drafts [n, n + a) and the extra token at n + a (when inside the grid).
    new_tokens = jnp.concatenate([s.window, jnp.zeros((b, 1), jnp.int32)], axis=1)
    new_tokens = jnp.where(steps == a[:, None], extra[:, None], new_tokens)
    write = (steps <= a[:, None]) & (n[:, None] + steps < n_tok) & active[:, None]
    idx = jnp.where(write, n[:, None] + steps, n_tok)
    tokens = s.tokens.at[bidx, idx].set(new_tokens, mode='drop')
    new_n = jnp.where(active, jnp.minimum(n + a + 1, n_tok), n)
    # Next window: position n + a + 1 + j is output a + 1 + j of this pass while there is
    # one (L - a of them), then initialised positions.
    samples = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 4), probs,
                                       greedy)                          # [B, L + 1]
    out = a[:, None] + 1 + steps[:, :window_len]                        # [B, L]
    fresh = drafts_lib.gather(samples, out, axis=1)
    fresh_q = drafts_lib.gather(probs, out, axis=1)
    window, window_q = fill(target_lib.sample_keys(keys, s.passes, 5), tokens, new_n,
                            fresh, fresh_q, window_len - a)
    s = s.replace(
        tokens=tokens, length=new_n,
        window=jnp.where(active[:, None], window, s.window),
        window_q=jnp.where(active[:, None, None], window_q, s.window_q),
        cache=target.commit(cache, target.prefix_len + new_n - 1),
        accepted=s.accepted + jnp.where(active, a, 0))
    return speculative.count_pass(s, active, new_n >= n_tok)

  s = jax.lax.while_loop(lambda s: jnp.any(s.length < n_tok), body, s)
  stats = {'target_passes': s.passes, 'draft_passes': jnp.int32(0),
           'sample_passes': s.sample_passes, 'accepted_drafts': s.accepted}
  return s.tokens, stats
