"""Plain raster-order AR decoding with the KV cache: the baseline every method is held to."""

import jax
import jax.numpy as jnp

from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib


def decode_ar(target, params, labels, keys):
  """labels [B], keys [B] -> (tokens [B, N], stats). One pass per token, N in all.

  Token i draws with its token key (keys.token_keys), so methods that resample "as AR
  would" reproduce these tokens.
  """
  b, n = labels.shape[0], target.model.num_tokens
  s = state_lib.start(target, params, labels, keys, keep_hidden=False)

  def body(s):
    i = s.passes  # AR commits one token per pass: the next index is the pass count
    slot = target.prefix_len + i - 1  # the previous token goes in; the next comes out
    prev = jax.lax.dynamic_slice_in_dim(s.tokens, i - 1, 1, axis=1)      # [B, 1]
    probs, _, cache = target.forward(params, prev, jnp.full((b, 1), slot), s.cache)
    tok = target.sample(keys_lib.token_keys(keys, i), probs[:, 0])
    return s.replace(tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None], i,
                                                                axis=1),
                     length=jnp.full((b,), i + 1),
                     cache=target.commit(cache, jnp.full((b,), target.prefix_len + i)),
                     passes=s.passes + 1)

  s = jax.lax.while_loop(lambda s: s.passes < n, body, s)
  return s.tokens, state_lib.stats(s.replace(sample_passes=jnp.full((b,), s.passes)), 0)


def build(bundle, target, options):
  del bundle, options
  return lambda params, labels, keys: decode_ar(target, params['ar'], labels, keys)


METHODS = (registry.Method('ar', 'plain raster decoding, one token per pass (the baseline)',
                           lossless=True, needs=(), options=registry.NoOptions, build=build,
                           block_tokens=lambda options, grid: 1),)
