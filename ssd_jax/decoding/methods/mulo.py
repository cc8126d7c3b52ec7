"""MuLo-SD (multi-scale local speculative decoding): LOSSY.

1. Draft. The drafter samples the low-resolution grid (7x7 pooled target tokens, see
   ssd_jax/models/mulo.py) autoregressively with its own KV cache (`ar.decode_ar` on a
   Target wrapping the drafter: the same CFG / temperature / top-k / top-p as the
   target), and the upsampler maps it to a full-grid draft: at every position the mode of
   its identically processed distribution.
2. Verify. ONE target pass over [condition prefix, draft] gives, at every position i, p_i
   given the draft before i. Position i passes the pooled-neighbourhood test when the
   target's mass on the draft token and its k nearest codes (the tokenizer's codebook) is
   >= tau. tau = 0 keeps the whole draft; tau > 1 rejects every position.
3. Local rejection. The rejected positions are grown by a (2l + 1)^2 square (radius l) and
   split into islands: components under 4-adjacency plus raster adjacency (position i
   touches i - 1 across a row end too, so the token a position is predicted from, its
   raster predecessor, is always final: accepted, or resampled earlier in the same
   island). Each island is resampled by the target in raster order, one position per pass,
   all islands at once (up to `lanes`, in order of their first position).

What a resampled position i conditions on: the condition prefix and every raster-earlier
position that is final by then -- accepted, or resampled (in any island) and fed. Raster-
earlier positions of islands not yet resampled that far are holes (masked out; never their
rejected drafts), and no position after i is seen, as in raster training. Keys/values: an
accepted token keeps the entry the verify pass computed, i.e. from the draft before it,
rejected drafts included; a resampled token's entry is computed when it is fed (the pass
after it is drawn) with the visibility above; a query standing on an accepted predecessor
writes to a scratch slot, so accepted entries never change. Token 0 depends on the class
only: when rejected it is redrawn exactly at once, without a pass.
What is lost against AR: accepted tokens stand although their context changed (the
rejected drafts before them were replaced) and the threshold admits tokens p makes
unlikely; holes; stale deep-layer entries of accepted tokens. With tau > 1 there is one
island, no holes and no stale entries: plain AR, token for token (same keys per token).

Target passes: 1 (verify) + the longest island's positions when every island has a lane
(more when islands wait for one); drafter passes: the low grid's h*w, plus 1 for the
upsampler.
"""

import dataclasses

import flax
import jax
import jax.numpy as jnp

from ssd_jax.decoding import codebook
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.methods import ar
from ssd_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class Options:
  # Chosen on validation seeds at 256 images (configs/mulo_tune.py): the most passes saved
  # within 1.3x the AR-vs-AR FID noise. Rerun at 1000 images, no setting of five that saves
  # passes stays within it (this one: 3.8x; docs/results.md): MuLo-SD is lossy here.
  tau: float = registry.option(0.03, 'Keep a draft token when the target mass on it and its '
                               'codebook neighbours is >= this.')
  k: int = registry.option(32, 'Codebook neighbours pooled with the draft token.')
  radius: int = registry.option(1, 'Rejected positions grow by this Chebyshev radius '
                                'before resampling.')
  lanes: int = registry.option(8, 'Islands resampled at once (0 = all there can be).')

  def validate(self, bundle):
    registry.check(0 <= self.tau < float('inf'), 'tau', self.tau,
                   'must be >= 0 (a probability mass; 0 = keep the whole draft, above 1 = '
                   'resample every position).')
    registry.check(self.k >= 0, 'k', self.k, 'must be >= 0 (0 = the draft token alone).')
    registry.check(self.radius >= 0, 'radius', self.radius,
                   'must be >= 0 (0 = resample only the rejected positions).')
    registry.check(self.lanes >= 0, 'lanes', self.lanes,
                   'must be >= 0 (0 = as many islands as the grid can hold).')
    if bundle is not None:
      vocab = bundle.model.vocab_size
      registry.check(self.k < vocab, 'k', self.k, f'must be < {vocab} (the codebook size: '
                     'the neighbours are the other codes).')
      check_stages(bundle)


@flax.struct.dataclass
class MuloState:
  tokens: jax.Array         # [B, N] int32 the draft, overwritten where resampled
  final: jax.Array          # [B, N] bool accepted, or resampled
  ready: jax.Array          # [B, N] bool the token's cache slot holds its final entry
  island: jax.Array         # [B, N] int32 island (its first raster position); N = none
  cache: transformer.KVCache  # [G*B]; prefix + N image slots + 2 * lanes scratch slots
  passes: jax.Array         # [] int32 target forward passes
  sample_passes: jax.Array  # [B] int32 passes after which each sample was complete


def pooled_accept(p, draft, neighbours, tau):
  """p [B, N, V], draft [B, N] -> [B, N] bool: p(draft) + p(its neighbours) >= tau."""
  near = jnp.concatenate([draft[..., None], neighbours[draft]], -1)   # [B, N, 1 + k]
  return jnp.sum(jnp.take_along_axis(p, near, -1), -1) >= tau


def grow(rejected, radius):
  """[B, H, W] bool -> the positions within Chebyshev distance `radius` of a rejected one."""
  if radius == 0:
    return rejected
  size = 2 * radius + 1
  return jax.lax.reduce_window(rejected.astype(jnp.int32), 0, jax.lax.max, (1, size, size),
                               (1, 1, 1), 'SAME') > 0


def label_islands(mask):
  """mask [B, H, W] bool -> [B, N] int32: each masked position's island, named by its first
  raster position; N where unmasked. Min-label propagation with pointer jumping."""
  b, h, w = mask.shape
  n = h * w
  m = mask.reshape(b, n)

  def shifted(x, d):  # x[:, i + d], N outside the grid
    pad = ((0, 0), (0, d)) if d > 0 else ((0, 0), (-d, 0))
    body = x[:, d:] if d > 0 else x[:, :d]
    return jnp.pad(body, pad, constant_values=n)

  def step(carry):
    lab, _ = carry
    near = jnp.minimum(jnp.minimum(shifted(lab, 1), shifted(lab, -1)),
                       jnp.minimum(shifted(lab, w), shifted(lab, -w)))
    new = jnp.where(m, jnp.minimum(lab, near), n)
    new = jnp.where(m, jnp.take_along_axis(new, jnp.minimum(new, n - 1), 1), n)
    return new, jnp.any(new != lab)

  lab, _ = jax.lax.while_loop(lambda c: c[1], step,
                              (jnp.where(m, jnp.arange(n), n), jnp.array(True)))
  return lab


def max_islands(grid, radius):
  """Islands a grid can hold: disjoint non-adjacent sets (at most ceil(N/2)), each with at
  least (radius + 1)^2 positions after growth."""
  n = grid[0] * grid[1]
  return max(1, min(-(-n // 2), n // (radius + 1) ** 2))


def _with_null(target, labels):
  if target.groups == 1:
    return labels
  return jnp.concatenate([labels, jnp.full_like(labels, target.model.null_class)])


def draft_grid(target, drafter, upsampler, params, labels, keys):
  """-> (draft [B, N] int32, drafter passes): low-res AR sample, then the upsampler."""
  low_target = target_lib.Target(drafter, target.sampling)
  low, stats = ar.decode_ar(low_target, params['mulo_draft'], labels,
                            keys_lib.fold(keys, keys_lib.Stream.LOW_RES))
  tile = lambda x: jnp.concatenate([x] * target.groups, axis=0)
  logits = upsampler.apply({'params': params['mulo_upsampler']}, tile(low),
                           _with_null(target, labels))                # [G*B, N, V]
  probs = target.probs(logits.reshape((target.groups, -1) + logits.shape[1:]))
  return jnp.argmax(probs, -1).astype(jnp.int32), stats['target_passes']


def verify(target, params, labels, draft, cache):
  """One pass over [prefix, draft[:, :N-1]] -> (p [B, N, V]: p_i given draft[:i], cache)."""
  prefix = target.prefix_len

  def run(model, labels, tokens, cache):
    x = jnp.concatenate([model.condition(labels), model.embed_tokens(tokens)], axis=1)
    slots = jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])
    logits, _, cache = model.step(x, slots, cache)  # empty cache: causal over the block
    return logits[:, prefix - 1:], cache

  tokens = jnp.concatenate([draft[:, :-1]] * target.groups, axis=0)
  logits, cache = target.model.apply({'params': params}, _with_null(target, labels), tokens,
                                     cache, method=run)
  return target.probs(logits.reshape((target.groups, -1) + logits.shape[1:])), cache


def decode_mulo(target, drafter, upsampler, params, labels, keys, neighbours, tau, radius,
                lanes):
  """labels [B], keys [B] -> (tokens [B, N], stats).

  params: {'ar', 'mulo_draft', 'mulo_upsampler'}; neighbours [V, k] from
  `codebook.neighbours`; lanes: islands resampled at once (0 = as many as can exist).
  """
  h, w = target.model.grid
  b, n, prefix = labels.shape[0], h * w, target.prefix_len
  lanes = lanes or max_islands((h, w), radius)
  t = 2 * lanes  # per lane: a query that predicts an island's next position, one that
                 # feeds a token drawn the pass before
  idx = jnp.arange(n)
  bidx = jnp.arange(b)[:, None]
  scratch = prefix + n + jnp.arange(t)
  backbone = params['ar']

  draft, draft_passes = draft_grid(target, drafter, upsampler, params, labels, keys)
  probs, cache = verify(target, backbone, labels, draft, target.init_cache(b, t))
  passed = pooled_accept(probs, draft, neighbours, tau)
  grown = grow(~passed.reshape(b, h, w), radius).reshape(b, n)
  island = label_islands(grown.reshape(b, h, w))
  # Token 0 is conditioned on the class alone: redraw it exactly, now.
  first = target.sample(keys_lib.token_keys(keys, 0), probs[:, 0])
  tokens = draft.at[:, 0].set(jnp.where(grown[:, 0], first, draft[:, 0]))
  final = ~grown | (idx == 0)
  s = MuloState(tokens=tokens, final=final, ready=~grown, island=island, cache=cache,
                passes=jnp.int32(1),
                sample_passes=jnp.where(jnp.all(final, -1), 1, 0).astype(jnp.int32))

  def body(s):
    in_island = s.island < n
    remaining = in_island & ~s.final
    pending = in_island & s.final & ~s.ready   # drawn last pass (<= lanes), not yet fed
    busy = jnp.zeros((b, n + 1), jnp.int32).at[bidx, s.island].max(
        remaining.astype(jnp.int32))[:, :n] > 0
    # The first `lanes` busy islands by first position: a started island keeps its lane.
    score, lane_island = jax.lax.top_k(jnp.where(busy, n - idx, 0), lanes)
    member = (s.island[:, None] == lane_island[..., None]) & (score > 0)[..., None]
    nxt = jnp.min(jnp.where(member & remaining[:, None], idx, n), -1)      # [B, L]
    # Predicting query: stands on nxt - 1 (nxt >= 1), fed its final token; writes the real
    # slot when that token was resampled (feeding it), else a scratch slot.
    a_on = nxt < n
    a_pos = jnp.clip(nxt - 1, 0, n - 1)
    a_real = a_on & (jnp.take_along_axis(s.island, a_pos, 1) < n)
    # Feeding queries: the tokens drawn last pass that no predicting query feeds.
    score, pend = jax.lax.top_k(jnp.where(pending, n - idx, 0), lanes)
    f_on = (score > 0) & ~jnp.any(a_real[:, None] & (a_pos[:, None] == pend[..., None]), -1)
    on = jnp.concatenate([a_on, f_on], 1)                                   # [B, T]
    real = jnp.concatenate([a_real, f_on], 1)
    stand = jnp.where(on, jnp.concatenate([a_pos, pend], 1), 0)
    slots = jnp.where(real, prefix + stand, scratch[None])
    feeding = jnp.zeros((b, n + 1), bool).at[bidx, jnp.where(real, stand, n)].set(True)
    seen = s.ready | feeding[:, :n]
    image = (on[..., None] & seen[:, None] & (idx < stand[..., None])) | (
        real[..., None] & (idx == stand[..., None]))                         # [B, T, N]
    own_scratch = jnp.eye(t, dtype=bool)[None] & ~real[..., None]
    visible = jnp.concatenate([jnp.ones((b, t, prefix), bool), image, own_scratch], -1)
    probs, _, cache = target.forward(backbone, jnp.take_along_axis(s.tokens, stand, 1),
                                     slots, s.cache, rope_pos=(stand // w, stand % w),
                                     visible=visible)
    new = target.sample(keys_lib.token_keys(keys, nxt), probs[:, :lanes])
    put = jnp.where(a_on, nxt, n)
    tokens = s.tokens.at[bidx, put].set(new, mode='drop')
    final = s.final.at[bidx, put].set(True, mode='drop')
    passes = s.passes + 1
    done = jnp.all(final, -1) & (s.sample_passes == 0)
    return s.replace(tokens=tokens, final=final, ready=seen, cache=cache, passes=passes,
                     sample_passes=jnp.where(done, passes, s.sample_passes))

  s = jax.lax.while_loop(lambda s: jnp.any(~s.final), body, s)
  stats = {'target_passes': s.passes, 'draft_passes': draft_passes + 1,
           'sample_passes': s.sample_passes,
           'accepted_drafts': jnp.sum(~grown, -1).astype(jnp.int32),
           'passed_test': jnp.sum(passed, -1).astype(jnp.int32),
           'islands': jnp.sum(grown & (island == idx), -1).astype(jnp.int32)}
  return s.tokens, stats


def check_stages(bundle):
  """Refuses drafter / upsampler stages that do not fit the target (before compiling)."""
  model = bundle.model
  draft, up = bundle.stage('mulo_draft').module, bundle.stage('mulo_upsampler').module
  if tuple(up.grid) != tuple(model.grid) or tuple(draft.grid) != tuple(up.low_grid):
    raise ValueError(f'{bundle.run_dir}: the upsampler maps {tuple(up.low_grid)} to '
                     f'{tuple(up.grid)} grids, but the drafter samples {tuple(draft.grid)} '
                     f'and the target {tuple(model.grid)}; the stages come from different '
                     'runs.')
  if not draft.vocab_size == up.vocab_size == model.vocab_size:
    raise ValueError(f'{bundle.run_dir}: the mulo stages use another vocabulary than the '
                     f'target\'s {model.vocab_size} codes; retrain them on this tokenizer.')


def build(bundle, target, options):
  neighbours = codebook.neighbours(bundle, options.k)
  drafter, upsampler = bundle.stage('mulo_draft').module, bundle.stage('mulo_upsampler').module
  return lambda params, labels, keys: decode_mulo(
      target, drafter, upsampler, params, labels, keys, neighbours, options.tau,
      options.radius, options.lanes)


METHODS = (registry.Method(
    'mulo', 'MuLo-SD: low-res drafter + upsampler, one verify pass, local resampling of '
    'rejected islands (LOSSY)', lossless=False,
    needs=('tokenizer', 'mulo_draft', 'mulo_upsampler'), options=Options, build=build,
    # The loop's passes (the one verify pass before it feeds the whole grid).
    block_tokens=lambda options, grid: 2 * (options.lanes or max_islands(grid, options.radius))),)
