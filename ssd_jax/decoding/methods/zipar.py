"""ZipAR's multi-row front: several rows decoded at once, no drafts. LOSSY.

Row r + 1 starts once row r has `window` tokens; from then on every pass samples one token
in every unfinished started row. A token thus never waits for the rest of the row above
(ZipAR's bet on spatial locality), which is what makes it lossy: row r + 1 is sampled
without seeing the end of row r. With window = W (the grid width) a row starts only when
the row above is complete and the result is plain AR decoding, token for token.

Schedule: token (r, c) is sampled in pass 1 + r * window + c (pass 1 is the prefill), so
an H x W grid takes (H - 1) * window + W passes (H * W for window = W).

Each pass feeds every row's newest token (sampled the pass before) in one block: one lane
per row, row r on lane r mod `num_lanes`, since at most ceil(W / window) consecutive rows
are feeding at once. The first token of a row is predicted before the row above is
complete, from the position (r, W - 1) that would predict it in raster order; as in
ZipAR's code, an extra query stands there, fed the newest token of row r (its keys and
values go to a scratch slot: the real (r, W - 1) is written later).

The committed tokens are not a prefix of the sequence here (each row has its own length),
so instead of the cache's committed length the pass passes the full visibility mask: a
query standing at raster position i sees the condition prefix and every committed image
token at raster position <= i -- rows above as far as they go, its own row up to itself,
never a row below -- including the tokens written by other lanes in the same pass; idle
lanes and the extra query write to scratch slots that no other query sees.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib
from ssd_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class Options:
  window: int = registry.option(0, 'Row r+1 starts when row r has this many tokens (0 = '
                                'half the grid width; the width = plain AR).')

  def validate(self, bundle):
    registry.check(self.window >= 0, 'window', self.window,
                   'must be >= 0 (0 = half the grid width).')
    width = bundle.model.grid[1] if bundle is not None else None
    registry.check(width is None or self.window <= width, 'window', self.window,
                   f'must be <= {width} (the grid width; {width} = plain AR).')

  def resolve(self, grid):
    return self.window or (grid[1] + 1) // 2


@flax.struct.dataclass
class ZipState:
  tokens: jax.Array         # [B, N] int32, -1 where not yet sampled
  fed: jax.Array            # [B, H] int32 tokens per row whose keys/values are cached
  cache: transformer.KVCache  # [G*B]; prefix + N image slots + a scratch slot per lane;
                              # length: the prefix + the raster prefix of fed tokens
  passes: jax.Array         # [] int32 target forward passes
  sample_passes: jax.Array  # [B] int32 passes after which each sample was complete


def num_passes(grid, window):
  """Sequential target passes of the schedule (prefill included)."""
  return (grid[0] - 1) * window + grid[1]


def num_lanes(grid, window):
  """Rows feeding at once: row r feeds in passes 2 + r*window .. 1 + r*window + W."""
  return min(grid[0], (grid[1] - 1) // window + 1)


def decode_zipar(target, params, labels, keys, window):
  """labels [B], keys [B] -> (tokens [B, N], stats). params: the backbone's."""
  h, w = target.model.grid
  b, n_tok, prefix = labels.shape[0], h * w, target.prefix_len
  lanes = num_lanes((h, w), window)
  extra_query = window < w      # a row can start before the row above is complete
  t = lanes + int(extra_query)
  scratch = prefix + n_tok + jnp.arange(t)                              # [T]
  start = state_lib.start(target, params, labels, keys, extra_slots=t, keep_hidden=False)
  s = ZipState(tokens=start.tokens, fed=jnp.zeros((b, h), jnp.int32), cache=start.cache,
               passes=start.passes, sample_passes=start.sample_passes)
  rows = jnp.arange(h)

  def body(s):
    count = jnp.sum(s.tokens.reshape(b, h, w) >= 0, axis=-1)           # [B, H]
    # Row lanes: the newest token of each row that has one not yet fed.
    feeding = s.fed < count
    sel = feeding[:, None, :] & ((rows % lanes)[None, None, :]
                                 == jnp.arange(lanes)[None, :, None])   # [B, lanes, H]
    lane_on = jnp.any(sel, -1)
    lane_row = jnp.argmax(sel, -1)
    lane_pos = lane_row * w + jnp.take_along_axis(count, lane_row, 1) - 1
    # Output of a row lane: the raster-next token, when it is not already sampled (the
    # first token of the next row may have come from the extra query).
    lane_out = lane_pos + 1
    below = jnp.take_along_axis(count, jnp.minimum(lane_row + 1, h - 1), 1)
    lane_use = lane_on & (lane_out < n_tok) & (
        (lane_out % w > 0) | ((lane_row + 1 < h) & (below == 0)))
    in_pos, stand, on, out, use = lane_pos, lane_pos, lane_on, lane_out, lane_use
    slots = jnp.where(lane_on, prefix + lane_pos, scratch[None, :lanes])
    if extra_query:
      # The next row to start, once the row above has `window` (but not all) tokens.
      nxt = jnp.argmin(count > 0, axis=-1)                             # [B]
      above_count = jnp.take_along_axis(count, jnp.maximum(nxt - 1, 0)[:, None], 1)[:, 0]
      q_on = (count[:, -1] == 0) & (above_count >= window) & (above_count < w)
      in_pos = jnp.concatenate([in_pos, ((nxt - 1) * w + above_count - 1)[:, None]], 1)
      stand = jnp.concatenate([stand, (nxt * w - 1)[:, None]], 1)
      on = jnp.concatenate([on, q_on[:, None]], 1)
      out = jnp.concatenate([out, (nxt * w)[:, None]], 1)
      use = jnp.concatenate([use, q_on[:, None]], 1)
      slots = jnp.concatenate([slots, jnp.broadcast_to(scratch[-1], (b, 1))], 1)
    in_tok = jnp.take_along_axis(s.tokens, jnp.clip(in_pos, 0, n_tok - 1), 1)
    in_tok = jnp.where(on, in_tok, 0)
    stand = jnp.where(on, stand, 0)
    # Visibility [B, T, P + N + T]: prefix; committed image tokens up to the query's own
    # raster position (a lane that is on stands on its own slot); own scratch slot.
    committed = s.tokens >= 0
    image = (committed[:, None, :] & (jnp.arange(n_tok)[None, None, :] <= stand[..., None])
             & on[..., None])
    own_scratch = jnp.eye(t, dtype=bool)[None] & (slots >= prefix + n_tok)[..., None]
    visible = jnp.concatenate([jnp.ones((b, t, prefix), bool), image, own_scratch], -1)
    probs, _, cache = target.forward(params, in_tok, slots, s.cache,
                                     rope_pos=(stand // w, stand % w), visible=visible)
    new = target.sample(keys_lib.token_keys(keys, out), probs)
    tokens = s.tokens.at[jnp.arange(b)[:, None], jnp.where(use, out, n_tok)].set(
        new, mode='drop')
    done = jnp.all(tokens >= 0, axis=-1)
    passes = s.passes + 1
    # Every token sampled before this pass is now in the cache.
    first_open = jnp.argmin(count == w, axis=-1)                          # [B]
    fed_prefix = jnp.where(jnp.all(count == w, axis=-1), n_tok,
                           first_open * w + jnp.take_along_axis(count, first_open[:, None],
                                                                1)[:, 0])
    return s.replace(tokens=tokens, fed=count, passes=passes,
                     cache=target.commit(cache, prefix + fed_prefix),
                     sample_passes=jnp.where(done & (s.sample_passes == 0), passes,
                                             s.sample_passes))

  s = jax.lax.while_loop(lambda s: jnp.any(s.tokens < 0), body, s)
  stats = {'target_passes': s.passes, 'draft_passes': jnp.int32(0),
           'sample_passes': s.sample_passes}
  return s.tokens, stats


def build(bundle, target, options):
  window = options.resolve(bundle.model.grid)
  return lambda params, labels, keys: decode_zipar(target, params['ar'], labels, keys, window)


METHODS = (registry.Method(
    'zipar', 'ZipAR multi-row front: next row starts after a window (LOSSY)', lossless=False,
    needs=(), options=Options, build=build,
    block_tokens=lambda options, grid: (num_lanes(grid, options.resolve(grid))
                                        + int(options.resolve(grid) < grid[1]))),)
