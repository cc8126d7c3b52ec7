"""Hawk: a trained 2D draft model, its drafts verified as a tree in one pass. LOSSLESS.

Each pass, after a sample's n committed tokens, for the K positions n .. n+K-1:
  * the horizontal chain: the drafter run K times, each step feeding its own predicted
    hidden state and sampled token back in (H_d for position n + d);
  * vertical drafts: q for every position of the current row, drafted from the finished
    row above once per row and cached (V_d for position n + d while it is in that row).
Tree (static): root = token n - 1; the spine H_0 -> H_1 -> ...; from H_{d-1} (root for
d = 0) also a vertical tail V_d -> V_{d+1} -> ... . K + K(K+1)/2 drafts, one target pass
(tree mask via block_mask, each node's grid position via rope_pos).

Acceptance walks down from the root with recursive rejection sampling (multi-draft
speculative sampling, as in SpecInfer): at the current node with target p, try the
children in order (H, then V), each accepted with min(1, r(x)/q(x)) where r starts as p and
becomes normalize(max(0, r - q)) after each rejection; if none stands, one token is drawn
from the last r and the pass ends (from p itself after a node with no children). Each
child was drawn independently from a q fixed by the node's ancestors and committed tokens
(H_d's by the chain H_0..H_{d-1}, V's by the rows above), and a draft token is tested at
most once per walk, so every committed token is distributed as p: the output is the
target's distribution; at temperature 0 (uniform = 0, one-hot p and q) it is AR's argmax.

The accepted nodes' keys/values are copied to their canonical slots (spine nodes already
sit there); everything after the committed length is garbage the cache masks out.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import state as state_lib
from ssd_jax.decoding.keys import Stream
from ssd_jax.models import hawk as hawk_model

gather = state_lib.gather
MAX_DRAFT_LEN = 8  # the chain's keys are Stream.CHAIN + d


@dataclasses.dataclass(frozen=True)
class Options:
  # 5 on release v3: the most target passes saved on validation seeds 1000 / 1001 (64
  # images each, batch 16; K = 4: 2.77x / 2.91x, 5: 3.10x / 2.97x, 6: 3.03x on 1000), at
  # ~10% more wall time per pass than K = 4 on a 2-core CPU (a 21-token tree, not 15).
  draft_len: int = registry.option(5, 'Horizontal chain length K (a tree of K + K(K+1)/2 '
                                   'drafts).')

  def validate(self, bundle):
    registry.check(1 <= self.draft_len <= MAX_DRAFT_LEN, 'draft_len', self.draft_len,
                   f'must be in [1, {MAX_DRAFT_LEN}] (the verified tree grows as '
                   'K + K(K+1)/2).')
    del bundle


def tree(k):
  """The static draft tree for chain length k: (parent [T+1], depth [T+1], vertical
  [T+1] bool, h_child [T+1], v_child [T+1]); node 0 is the root, a node of depth d + 1
  drafts position n + d, -1 = no such child. Spine H_d is node d + 1."""
  parent, depth, vertical = [-1] + list(range(k)), list(range(k + 1)), [False] * (k + 1)
  h_child = list(range(1, k + 1)) + [-1]
  v_child = [-1] * (k + 1)
  for d in range(k):
    prev = d  # H_{d-1}, the root for d = 0
    for e in range(d, k):
      node = len(parent)
      parent.append(prev)
      depth.append(e + 1)
      vertical.append(True)
      h_child.append(-1)
      v_child.append(-1)
      v_child[prev] = node
      prev = node
  return tuple(np.array(x) for x in (parent, depth, vertical, h_child, v_child))


def ancestor_mask(parent):
  """parent [T] (-1 = root) -> [T, T] bool: node t sees itself and its ancestors."""
  t = len(parent)
  mask = np.eye(t, dtype=bool)
  for i in range(t):
    j = parent[i]
    while j >= 0:
      mask[i, j] = True
      j = parent[j]
  return mask


class HawkDecoder:
  """decode(params, labels, keys) for a Target and a HawkDrafter; params: {'ar',
  'hawk_draft'}. Method fields of the decode state (state.extra): row [B] the row whose
  vertical drafts row_q [B, W, V] holds (-1: none), draft_passes [] drafter calls,
  accepted_vertical [B] accepted drafts that were vertical."""

  def __init__(self, target, drafter, k):
    self.target, self.drafter, self.k = target, drafter, k
    self.parent, self.depth, self.vertical, self.h_child, self.v_child = tree(k)
    self.mask = jnp.asarray(ancestor_mask(self.parent))

  def _draft(self, params, s, pos, src, vertical, chain=None):
    """Drafter at positions pos [B, Q], sources src [B, Q], from the committed buffers
    s.tokens [B, N], s.hidden [G, B, N, D] -> (predicted hidden [G, B, Q, D], q [B, Q, V]).

    chain: (tokens [B, K], hidden [G, B, K, D], d): the horizontal chain's first d drafts,
    read in place of the buffers at positions n .. n+d-1, as if committed there.
    """
    b, q = pos.shape
    idx, _ = hawk_model.window_positions(pos, self.drafter.grid, self.drafter.offsets,
                                         vertical)
    # One read for the window and the sources: [B, Q*K + Q].
    tokens, hidden = self._read(s, jnp.concatenate([idx.reshape(b, -1), src], 1), chain)
    embed = lambda t: self.target.embed(params['ar'], jnp.maximum(t, 0))
    win_hidden = hidden[:, :, :-q].reshape(hidden.shape[:2] + idx.shape[1:] + (-1,))
    win_emb = embed(tokens[:, :-q]).reshape(idx.shape + (-1,))
    pred = self.drafter.apply({'params': params['hawk_draft']}, hidden[:, :, -q:],
                              embed(tokens[:, -q:]), win_hidden, win_emb, pos, vertical,
                              method=self.drafter.draft)
    return pred, self.target.draft_probs(params['ar'], pred)

  def _read(self, s, idx, chain):
    """Tokens [B, M] and hidden [G, B, M, D] at positions idx [B, M], clipped to the grid
    as `gather` clips: the committed buffers', or the chain's where it has drafted."""
    tokens, hidden = gather(s.tokens, idx, axis=1), gather(s.hidden, idx, axis=2)
    if chain is None:
      return tokens, hidden
    chain_tokens, chain_hidden, d = chain
    # Past the grid's end a chain step has no slot; its position clips to the last one,
    # which the chain drafted itself (j < d) by then, as when the buffer took each step.
    j = jnp.clip(idx, 0, s.tokens.shape[1] - 1) - s.length[:, None]      # [B, M]
    own = (j >= 0) & (j < d)
    j = jnp.clip(j, 0, chain_tokens.shape[1] - 1)
    tokens = jnp.where(own, gather(chain_tokens, j, axis=1), tokens)
    hidden = jnp.where(own[..., None], gather(chain_hidden, j, axis=2), hidden)
    return tokens, hidden

  def _chain(self, params, keys, s):
    """The horizontal chain: tokens [B, K] drawn from q [B, K, V]."""

    def step(carry, d):
      tokens, hidden = carry  # the chain's drafts so far: [B, K], [G, B, K, D]
      pos = s.length + d
      pred, q = self._draft(params, s, pos[:, None], pos[:, None] - 1, vertical=False,
                            chain=(tokens, hidden, d))
      tok = self.target.sample(keys_lib.pass_keys(keys, s.passes, Stream.CHAIN, d), q[:, 0])
      return (tokens.at[:, d].set(tok), hidden.at[:, :, d].set(pred[:, :, 0])), (tok, q[:, 0])

    b, (g, _, _, dim) = s.length.shape[0], s.hidden.shape
    # Only the chain's own K entries are carried, not the [G, B, N, D] buffer that every
    # step would copy to place one draft in it.
    init = (jnp.zeros((b, self.k), jnp.int32), jnp.zeros((g, b, self.k, dim), s.hidden.dtype))
    _, (drafted, qs) = jax.lax.scan(step, init, jnp.arange(self.k))
    return drafted.T, jnp.swapaxes(qs, 0, 1)

  def _update_row(self, params, s, active):
    """Vertical drafts of the row holding position n, when not cached yet (rows >= 1)."""
    w = self.drafter.grid[1]
    row = s.length // w
    cached = s.extra['row']
    need = active & (row != cached) & (row >= 1)

    def compute():
      pos = jnp.maximum(row, 1)[:, None] * w + jnp.arange(w)[None]       # [B, W]
      return self._draft(params, s, pos, pos - w, vertical=True)[1]

    row_q = jax.lax.cond(jnp.any(need), compute, lambda: s.extra['row_q'])
    return s.replace(extra=dict(
        s.extra, row=jnp.where(need, row, cached),
        row_q=jnp.where(need[:, None, None], row_q, s.extra['row_q']),
        draft_passes=s.extra['draft_passes'] + jnp.any(need).astype(jnp.int32)))

  def _walk(self, keys, s, probs, h_tok, h_q, v_tok, v_q, active):
    """Recursive rejection down the tree -> (a [B] accepted, path [B, K + 1] nodes from the
    root, path tokens [B, K], extra token [B], vertical accepts [B])."""
    b, n_tok = s.tokens.shape
    pos = s.length[:, None] + jnp.arange(self.k)[None]                    # [B, K]
    h_ok = pos < n_tok
    row = s.extra['row'][:, None]
    v_ok = h_ok & (pos // self.drafter.grid[1] == row) & (row >= 1)
    u = keys_lib.uniforms(keys, s.passes, Stream.ACCEPT, (self.k, 2),
                          self.target.sampling.greedy)
    h_child, v_child = jnp.asarray(self.h_child), jnp.asarray(self.v_child)
    accept_multi = acceptance.accept_multi  # looked up per build: tests inject broken rules

    def down(carry, xs):  # one depth: the current node's children, H then V
      cur, alive, a, n_vertical, extra_probs = carry
      u_e, h_ok_e, v_ok_e, h_tok_e, v_tok_e, h_q_e, v_q_e = xs
      p = gather(probs, cur[:, None], axis=1)[:, 0]                       # [B, V]
      hc, vc = h_child[cur], v_child[cur]
      present = jnp.stack([(hc >= 0) & h_ok_e, (vc >= 0) & v_ok_e], 1)
      choice, r = accept_multi(u_e, p, jnp.stack([h_tok_e, v_tok_e], 1),
                               jnp.stack([h_q_e, v_q_e], 1), present)
      stood = choice >= 0
      extra_probs = jnp.where((alive & ~stood)[:, None], r, extra_probs)
      cur = jnp.where(alive & stood, jnp.where(choice == 0, hc, vc), cur)
      carry = (cur, alive & stood, a + (alive & stood), n_vertical + (alive & (choice == 1)),
               extra_probs)
      return carry, (cur, jnp.where(choice == 0, h_tok_e, v_tok_e))

    zero = jnp.zeros((b,), jnp.int32)
    xs = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), (u, h_ok, v_ok, h_tok, v_tok, h_q, v_q))
    (cur, alive, a, n_vertical, extra_probs), (path, path_tokens) = jax.lax.scan(
        down, (zero, active, zero, zero, jnp.zeros_like(probs[:, 0])), xs)
    # Every draft stood: the bonus token from the last node's p.
    extra_probs = jnp.where(alive[:, None], gather(probs, cur[:, None], axis=1)[:, 0],
                            extra_probs)
    extra = self.target.sample(keys_lib.pass_keys(keys, s.passes, Stream.EXTRA), extra_probs)
    path = jnp.concatenate([zero[:, None], path.T], 1)  # the root first
    return a, path, path_tokens.T, extra, n_vertical

  def _compact(self, cache, n, path, a):
    """Moves the accepted nodes' keys/values to canonical slots prefix + n + e."""
    g = self.target.groups
    p = self.target.prefix_len
    e = jnp.arange(self.k)[None]
    dst = p + n[:, None] + e                                              # [B, K]
    src = jnp.where(e < a[:, None], p + n[:, None] - 1 + path[:, 1:], dst)
    dst, src = jnp.tile(dst, (g, 1)), jnp.tile(src, (g, 1))
    bidx = jnp.arange(dst.shape[0])[:, None]
    # The cache is [L, B, H, S, Dh]: the slot axis comes after the heads.
    return cache.replace(k=cache.k.at[:, bidx, :, dst].set(cache.k[:, bidx, :, src]),
                         v=cache.v.at[:, bidx, :, dst].set(cache.v[:, bidx, :, src]))

  def step(self, params, keys, s):
    """One pass: draft, verify the tree, accept, commit."""
    n_tok = s.tokens.shape[1]
    w = self.drafter.grid[1]
    n = s.length
    active = n < n_tok
    s = self._update_row(params, s, active)
    h_tok, h_q = self._chain(params, keys, s)                             # [B, K], [B, K, V]
    pos = n[:, None] + jnp.arange(self.k)[None]
    v_q = gather(s.extra['row_q'], pos % w, axis=1)                       # [B, K, V]
    v_tok = self.target.sample(keys_lib.pass_keys(keys, s.passes, Stream.DRAFT), v_q)
    # The block: root (token n - 1) and every node's draft, at consecutive slots.
    node_draft = jnp.maximum(jnp.asarray(self.depth) - 1, 0)
    block = jnp.where(jnp.asarray(self.vertical)[None], v_tok[:, node_draft],
                      h_tok[:, node_draft])
    block = block.at[:, 0].set(state_lib.last_token(s)[:, 0])
    slots = self.target.prefix_len + n[:, None] - 1 + jnp.arange(len(self.parent))[None]
    node_pos = n[:, None] - 1 + jnp.asarray(self.depth)[None]
    probs, hidden, cache = self.target.forward(params['ar'], block, slots, s.cache,
                                               self.mask, (node_pos // w, node_pos % w))
    a, path, path_tokens, extra, n_vertical = self._walk(keys, s, probs, h_tok, h_q, v_tok,
                                                         v_q, active)
    a = jnp.where(active, a, 0)
    cache = self._compact(cache, n, path, a)
    # h(n + e) is the output at path node e (the root for e = 0).
    s = state_lib.commit(self.target, s, path_tokens, a, extra, active, cache,
                         gather(hidden, path, axis=2))
    s = s.replace(extra=dict(s.extra, draft_passes=s.extra['draft_passes'] + self.k,
                             accepted_vertical=s.extra['accepted_vertical'] + n_vertical))
    return state_lib.count_pass(s, active)

  def decode(self, params, labels, keys):
    """labels [B], keys [B] -> (tokens [B, N], stats)."""
    b, w = labels.shape[0], self.drafter.grid[1]
    vocab = self.target.model.vocab_size
    extra = dict(row=jnp.full((b,), -1, jnp.int32), row_q=jnp.zeros((b, w, vocab)),
                 draft_passes=jnp.int32(0), accepted_vertical=jnp.zeros((b,), jnp.int32))
    # Cache room: the tree may run past the grid's end.
    s = state_lib.start(self.target, params['ar'], labels, keys,
                        extra_slots=len(self.parent) + 1, extra=extra)
    s = jax.lax.while_loop(state_lib.unfinished, lambda s: self.step(params, keys, s), s)
    return s.tokens, state_lib.stats(s, s.extra['draft_passes'],
                                     accepted_vertical=s.extra['accepted_vertical'])


def build(bundle, target, options):
  drafter = bundle.stage('hawk_draft').module
  return HawkDecoder(target, drafter, options.draft_len).decode


METHODS = (registry.Method(
    'hawk', 'Hawk: 2D local-attention draft model, horizontal + vertical drafts verified as '
    'a tree (lossless)', lossless=True, needs=('hawk_draft',), options=Options, build=build,
    block_tokens=lambda options, grid: len(tree(options.draft_len)[0])),)
