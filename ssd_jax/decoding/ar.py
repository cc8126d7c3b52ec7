"""Plain raster-order AR decoding with the KV cache: the baseline every method is held to."""

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import target as target_lib
from ssd_jax.models import transformer


@flax.struct.dataclass
class ARState:
  tokens: jax.Array   # [B, N] int32, -1 where not yet sampled
  index: jax.Array    # [] int32, next token index (AR commits one per pass)
  cache: transformer.KVCache  # [G*B] batch, prefix + N slots
  passes: jax.Array   # [] int32 target forward passes so far


def decode_ar(target: target_lib.Target, params, labels, keys):
  """labels [B], keys [B] -> (tokens [B, N], stats). One pass per token, N in all."""
  b = labels.shape[0]
  n = target.model.num_tokens
  p = target.prefix_len
  greedy = target.sampling.greedy
  probs, _, cache = target.prefill(params, labels, target.init_cache(b))
  first = target_lib.sample_tokens(target_lib.sample_keys(keys, 0), probs, greedy)
  tokens = jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first)
  state = ARState(tokens=tokens, index=jnp.int32(1),
                  cache=target.commit(cache, jnp.full((b,), p)), passes=jnp.int32(1))

  def body(s):
    slot = p + s.index - 1  # the previous token goes in; the next one comes out
    prev = jax.lax.dynamic_slice_in_dim(s.tokens, s.index - 1, 1, axis=1)  # [B, 1]
    probs, _, cache = target.forward(params, prev, jnp.full((b, 1), slot), s.cache)
    tok = target_lib.sample_tokens(target_lib.sample_keys(keys, s.index), probs[:, 0],
                                   greedy)
    return ARState(tokens=jax.lax.dynamic_update_slice_in_dim(s.tokens, tok[:, None],
                                                              s.index, axis=1),
                   index=s.index + 1, cache=target.commit(cache, jnp.full((b,), slot + 1)),
                   passes=s.passes + 1)

  state = jax.lax.while_loop(lambda s: s.index < n, body, state)
  stats = {'target_passes': state.passes, 'draft_passes': jnp.int32(0),
           'sample_passes': jnp.full((b,), state.passes)}
  return state.tokens, stats
