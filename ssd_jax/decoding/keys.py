"""The named PRNG streams of decoding: every random draw of every method is keyed here.

Image b's randomness comes from its own key (fold_in(key(seed), b), see engine.image_keys),
so its tokens do not depend on the batch it is decoded in. Two kinds of draws:
  * per token: token i drawn straight from the target in raster order (AR, and token 0 of
    every method) uses fold_in(key, i), so methods that resample a token "as AR would"
    (ZipAR, MuLo-SD) give AR's token for the same context;
  * per pass: a draw of pass t in stream s uses fold_in(fold_in(key, t), s); the streams
    below keep the draws of one pass independent of each other.
"""

import enum

import jax
import jax.numpy as jnp


class Stream(enum.IntEnum):
  """The independent draws of one pass."""
  DRAFT = 1          # draft tokens drawn from q (heads, Hawk's vertical drafts)
  ACCEPT = 2         # uniforms of the acceptance test
  EXTRA = 3          # the token after the accepted drafts (residual, p, or bonus)
  ROW_ACCEPT = 4     # SSD: uniforms of a row's verify round
  ROW_FIX = 5        # SSD: replacements of a row's rejected drafts
  ROW_NEXT = 6       # SSD: token (y + 1, 0) from the pass that commits row y
  ROW_DRAFT = 7      # SSD: a row's vertical drafts
  WINDOW_NEXT = 8    # SJD: this pass's samples, the next window's drafts
  WINDOW_FILL = 9    # SJD: drafts of positions new to the window
  CHAIN = 10         # Hawk: horizontal chain step d draws with CHAIN + d (d < 8)
  LOW_RES = 1 << 20  # MuLo-SD: the low-resolution drafter's own per-token keys


def fold(keys, *values):
  """keys [B] folded with each value in turn (scalars, the same for every sample)."""
  for v in values:
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, v)
  return keys


def pass_keys(keys, passes, stream, offset=0):
  """[B] keys of stream `stream` (+ offset) in pass `passes` ([] or each sample's own [B])."""
  passes = jnp.asarray(passes)
  if passes.ndim:
    keys = jax.vmap(jax.random.fold_in)(keys, passes)
    return fold(keys, int(stream) + offset)
  return fold(keys, passes, int(stream) + offset)


def token_keys(keys, idx):
  """keys [B], raster indices idx [] / [B] / [B, T] -> keys of the same shape as idx's
  batch: token i of image b draws with fold_in(keys[b], i)."""
  idx = jnp.asarray(idx, jnp.int32)
  if idx.ndim == 0:
    return fold(keys, idx)
  if idx.ndim == 1:
    return jax.vmap(jax.random.fold_in)(keys, idx)
  return jax.vmap(lambda k, i: jax.vmap(lambda j: jax.random.fold_in(k, j))(i))(keys, idx)


def uniforms(keys, passes, stream, shape, greedy):  # passes: [] or [B]
  """[B, *shape] uniforms in [0, 1) of a stream; zeros at temperature 0, where the exact
  rule with one-hot p and q is the argmax match and the lossy rules accept by mass."""
  if greedy:
    return jnp.zeros(keys.shape + tuple(shape))
  return jax.vmap(lambda k: jax.random.uniform(k, shape))(pass_keys(keys, passes, stream))
