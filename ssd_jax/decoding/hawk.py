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

import flax
import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import drafts as drafts_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import hawk as hawk_model
from ssd_jax.models import transformer

gather = drafts_lib.gather


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
    r = jnp.where((test & ~ok)[:, None], acceptance.residual(r, q), r)
  return choice, r


@flax.struct.dataclass
class HawkState:
  tokens: jax.Array         # [B, N] int32, -1 where not yet committed
  length: jax.Array         # [B] int32 committed tokens n; tokens [0, n) are final
  hidden: jax.Array         # [G, B, N, D] h(i): the target state that predicted token i
  cache: transformer.KVCache  # [G*B]; holds slots of tokens [0, n - 1) (+ prefix)
  row: jax.Array            # [B] int32 row whose vertical drafts row_q holds (-1: none)
  row_q: jax.Array          # [B, W, V] vertical draft distributions of that row
  passes: jax.Array         # [] int32 target forward passes
  draft_passes: jax.Array   # [] int32 drafter calls (chain steps and row drafts)
  sample_passes: jax.Array  # [B] int32 passes after which each sample was complete
  accepted: jax.Array       # [B] int32 drafted tokens accepted
  accepted_vertical: jax.Array  # [B] int32 ... of which vertical drafts


class HawkDecoder:
  """decode(params, labels, keys) for a Target and a HawkDrafter; params: {'backbone',
  'hawk'}."""

  def __init__(self, target, drafter, k):
    self.target, self.drafter, self.k = target, drafter, k
    self.parent, self.depth, self.vertical, self.h_child, self.v_child = tree(k)
    self.mask = jnp.asarray(ancestor_mask(self.parent))

  def _draft(self, params, tokens, hidden, pos, src, vertical):
    """Drafter at positions pos [B, Q] from buffers tokens [B, N], hidden [G, B, N, D]
    -> (predicted hidden [G, B, Q, D], q [B, Q, V])."""
    b, q = pos.shape
    idx, _ = hawk_model.window_positions(pos, self.drafter.grid, self.drafter.offsets,
                                         vertical)
    embed = lambda t: self.target.embed(params['backbone'], jnp.maximum(t, 0))
    flat = idx.reshape(b, -1)
    win_hidden = gather(hidden, flat, axis=2).reshape(hidden.shape[:2] + idx.shape[1:] + (-1,))
    win_emb = embed(gather(tokens, flat, axis=1)).reshape(idx.shape + (-1,))
    src_emb = embed(gather(tokens, src, axis=1))
    pred = self.drafter.apply({'params': params['hawk']}, gather(hidden, src, axis=2),
                              src_emb, win_hidden, win_emb, pos, vertical,
                              method=self.drafter.draft)
    return pred, self.target.draft_probs(params['backbone'], pred)

  def _chain(self, params, keys, s):
    """The horizontal chain: tokens [B, K] drawn from q [B, K, V]."""
    bidx = jnp.arange(s.length.shape[0])

    def step(carry, d):
      tokens, hidden = carry
      pos = s.length + d
      pred, q = self._draft(params, tokens, hidden, pos[:, None], pos[:, None] - 1,
                            vertical=False)
      tok = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 10 + d), q[:, 0],
                                     self.target.sampling.greedy)
      # Later steps see this step's draft as committed (dropped past the grid's end).
      hidden = hidden.at[:, bidx, pos].set(pred[:, :, 0], mode='drop')
      return (tokens.at[bidx, pos].set(tok, mode='drop'), hidden), (tok, q[:, 0])

    _, (drafted, qs) = jax.lax.scan(step, (s.tokens, s.hidden), jnp.arange(self.k))
    return drafted.T, jnp.swapaxes(qs, 0, 1)

  def _update_row(self, params, s, active):
    """Vertical drafts of the row holding position n, when not cached yet (rows >= 1)."""
    w = self.drafter.grid[1]
    row = s.length // w
    need = active & (row != s.row) & (row >= 1)

    def compute():
      pos = jnp.maximum(row, 1)[:, None] * w + jnp.arange(w)[None]       # [B, W]
      return self._draft(params, s.tokens, s.hidden, pos, pos - w, vertical=True)[1]

    row_q = jax.lax.cond(jnp.any(need), compute, lambda: s.row_q)
    return s.replace(row=jnp.where(need, row, s.row),
                     row_q=jnp.where(need[:, None, None], row_q, s.row_q),
                     draft_passes=s.draft_passes + jnp.any(need).astype(jnp.int32))

  def _walk(self, keys, s, probs, h_tok, h_q, v_tok, v_q, active):
    """Recursive rejection down the tree -> (a [B] accepted, path [B, K + 1] nodes from the
    root, path tokens [B, K], extra token [B], vertical accepts [B])."""
    b, n_tok = s.tokens.shape
    greedy = self.target.sampling.greedy
    pos = s.length[:, None] + jnp.arange(self.k)[None]                    # [B, K]
    h_ok = pos < n_tok
    v_ok = h_ok & (pos // self.drafter.grid[1] == s.row[:, None]) & (s.row[:, None] >= 1)
    u = jnp.zeros((b, self.k, 2)) if greedy else jax.vmap(
        lambda key: jax.random.uniform(key, (self.k, 2)))(
            target_lib.sample_keys(keys, s.passes, 2))
    h_child, v_child = jnp.asarray(self.h_child), jnp.asarray(self.v_child)

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
    extra = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 3), extra_probs,
                                     greedy)
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
    return cache.replace(k=cache.k.at[:, bidx, dst].set(cache.k[:, bidx, src]),
                         v=cache.v.at[:, bidx, dst].set(cache.v[:, bidx, src]))

  def step(self, params, keys, s):
    """One pass: draft, verify the tree, accept, commit."""
    b, n_tok = s.tokens.shape
    w = self.drafter.grid[1]
    n, p_len = s.length, self.target.prefix_len
    active = n < n_tok
    s = self._update_row(params, s, active)
    h_tok, h_q = self._chain(params, keys, s)                             # [B, K], [B, K, V]
    pos = n[:, None] + jnp.arange(self.k)[None]
    v_q = gather(s.row_q, pos % w, axis=1)                                # [B, K, V]
    v_tok = target_lib.sample_tokens(target_lib.sample_keys(keys, s.passes, 4), v_q,
                                     self.target.sampling.greedy)
    # The block: root (token n - 1) and every node's draft, at consecutive slots.
    node_draft = jnp.maximum(jnp.asarray(self.depth) - 1, 0)
    block = jnp.where(jnp.asarray(self.vertical)[None], v_tok[:, node_draft],
                      h_tok[:, node_draft])
    block = block.at[:, 0].set(gather(s.tokens, (n - 1)[:, None], axis=1)[:, 0])
    slots = p_len + n[:, None] - 1 + jnp.arange(len(self.parent))[None]
    node_pos = n[:, None] - 1 + jnp.asarray(self.depth)[None]
    probs, hidden, cache = self.target.forward(params['backbone'], block, slots, s.cache,
                                               self.mask, (node_pos // w, node_pos % w))
    a, path, path_tokens, extra, n_vertical = self._walk(keys, s, probs, h_tok, h_q, v_tok,
                                                         v_q, active)
    a = jnp.where(active, a, 0)
    cache = self._compact(cache, n, path, a)
    # Commit positions n .. n + a: the path's drafts, then the extra token; h(n + e) is
    # the output at path node e (the root for e = 0).
    steps = jnp.arange(self.k + 1)[None]
    new_tokens = jnp.concatenate([path_tokens, extra[:, None]], 1)
    new_tokens = jnp.where(steps == a[:, None], extra[:, None], new_tokens)
    write = (steps <= a[:, None]) & (n[:, None] + steps < n_tok) & active[:, None]
    idx = jnp.where(write, n[:, None] + steps, n_tok)
    bidx = jnp.arange(b)[:, None]
    new_n = jnp.where(active, jnp.minimum(n + a + 1, n_tok), n)
    passes = s.passes + 1
    return s.replace(
        tokens=s.tokens.at[bidx, idx].set(new_tokens, mode='drop'),
        hidden=s.hidden.at[:, bidx, idx].set(gather(hidden, path, axis=2), mode='drop'),
        length=new_n, cache=self.target.commit(cache, p_len + new_n - 1), passes=passes,
        draft_passes=s.draft_passes + self.k,
        sample_passes=jnp.where(active & (new_n >= n_tok), passes, s.sample_passes),
        accepted=s.accepted + a, accepted_vertical=s.accepted_vertical + n_vertical)

  def init_state(self, params, labels, keys):
    """Prefill (one target pass) and token 0 for every sample."""
    target = self.target
    b, n = labels.shape[0], target.model.num_tokens
    extra_slots = len(self.parent) + 1  # the tree may run past the grid's end
    probs, hidden, cache = target.prefill(params['backbone'], labels,
                                          target.init_cache(b, extra_slots))
    first = target_lib.sample_tokens(target_lib.sample_keys(keys, 0, 0), probs,
                                     target.sampling.greedy)
    buf = jnp.zeros(hidden.shape[:2] + (n,) + hidden.shape[2:], hidden.dtype)
    zero = jnp.zeros((b,), jnp.int32)
    return HawkState(
        tokens=jnp.full((b, n), -1, jnp.int32).at[:, 0].set(first),
        length=jnp.ones((b,), jnp.int32), hidden=buf.at[:, :, 0].set(hidden),
        cache=target.commit(cache, jnp.full((b,), target.prefix_len)),
        row=jnp.full((b,), -1, jnp.int32),
        row_q=jnp.zeros((b, self.drafter.grid[1], probs.shape[-1]), probs.dtype),
        passes=jnp.int32(1), draft_passes=jnp.int32(0), sample_passes=zero,
        accepted=zero, accepted_vertical=zero)

  def decode(self, params, labels, keys):
    """labels [B], keys [B] -> (tokens [B, N], stats)."""
    n_tok = self.target.model.num_tokens
    s = self.init_state(params, labels, keys)
    s = jax.lax.while_loop(lambda s: jnp.any(s.length < n_tok),
                           lambda s: self.step(params, keys, s), s)
    stats = {'target_passes': s.passes, 'draft_passes': s.draft_passes,
             'sample_passes': s.sample_passes, 'accepted_drafts': s.accepted,
             'accepted_vertical': s.accepted_vertical}
    return s.tokens, stats
