"""AR transformer, KV cache, axial 2D RoPE and neighbour heads on a tiny model."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssd_jax import sharding
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import layers
from ssd_jax.models import transformer
from ssd_jax.training import heads_stage

# Cached and full passes reduce in different orders; float32 logits agree to this.
TOL = 1e-5
GRID = (4, 5)  # not square, so a row/column mix-up shows
N = GRID[0] * GRID[1]
PREFIX = 2
BATCH = 3
EXTRA = 8  # cache slots past the grid, for blocks that run over its end


@pytest.fixture(scope='module')
def model():
  return transformer.Transformer(vocab_size=16, num_classes=3, grid=GRID, num_layers=2, dim=32,
                                 num_heads=2, mlp_dim=64, prefix_len=PREFIX, rope_base=10.0)


@pytest.fixture(scope='module')
def params(model):
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, N), jnp.int32),
                                       jnp.zeros((1,), jnp.int32)))
  return sharding.strip_boxes(init(jax.random.key(0))['params'])


@pytest.fixture(scope='module')
def data():
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.integers(0, 16, (BATCH, N)), jnp.int32),
          jnp.asarray([0, 2, 3], jnp.int32))  # 3 = the null class


@pytest.fixture(scope='module')
def forward(model, params):
  return jax.jit(lambda t, l: model.apply({'params': params}, t, l))


@pytest.fixture(scope='module')
def full(forward, data):
  """Logits and hidden states of one teacher-forced pass over the whole grid."""
  return forward(*data)


@pytest.fixture(scope='module')
def fns(model, params):
  prefill = jax.jit(lambda cond, cache: model.apply(
      {'params': params}, cond, cache, method=model.prefill))
  cond = jax.jit(lambda labels: model.apply({'params': params}, labels, method=model.condition))
  decode = jax.jit(lambda t, s, c, m=None, r=None: model.apply(
      {'params': params}, t, s, c, m, r, method=model.decode))
  return cond, prefill, decode


def test_loss_falls(model, params, data):
  tokens, labels = data
  tx = optax.adam(1e-2)

  def loss_fn(p, key):
    logits, _ = model.apply({'params': p}, tokens, labels, train=True, rngs={'dropout': key})
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))

  @jax.jit
  def step(p, opt, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  p, opt, losses = params, tx.init(params), []
  for i in range(8):
    p, opt, loss = step(p, opt, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.7 * losses[0], losses


def test_full_pass_is_causal(forward, data, full):
  """Changing token i changes no prediction of tokens 0..i."""
  tokens, labels = data
  logits, _ = forward(tokens.at[:, 7].set((tokens[:, 7] + 1) % 16), labels)
  np.testing.assert_allclose(logits[:, :8], full[0][:, :8], atol=TOL)
  assert not np.allclose(logits[:, 8:], full[0][:, 8:], atol=1e-3)


def test_label_dropout_is_the_null_class(model, params, data):
  tokens, labels = data

  @jax.jit
  def both(p):
    dropped = model.clone(label_dropout=1.0).apply(
        {'params': p}, tokens, labels, train=True, rngs={'dropout': jax.random.key(0)})[0]
    null = model.apply({'params': p}, tokens, jnp.full_like(labels, model.null_class))[0]
    return dropped, null

  dropped, null = both(params)
  np.testing.assert_allclose(dropped, null, atol=TOL)


def test_cache_blocks_at_ragged_positions_match_full_pass(model, data, full, fns):
  """Prefill, a partly rejected block, then blocks of 1, 3, 7 at per-sample offsets."""
  tokens, labels = data
  full_logits, full_hidden = np.asarray(full[0]), np.asarray(full[1])
  cond, prefill, decode = fns
  cache = model.init_cache(BATCH, extra_slots=EXTRA)
  logits, hidden, cache = prefill(cond(labels), cache)
  logits, hidden = np.asarray(logits), np.asarray(hidden)
  np.testing.assert_allclose(logits[:, 0], full_logits[:, 0], atol=TOL)
  np.testing.assert_allclose(hidden[:, 0], full_hidden[:, 0], atol=TOL)
  cache = cache.commit(jnp.full((BATCH,), PREFIX))

  # Tokens past the end of the grid only pad the blocks; their outputs are not compared.
  padded = np.concatenate([np.asarray(tokens), np.zeros((BATCH, 32), np.int32)], 1)
  checked = np.zeros((BATCH, N), bool)

  def run_block(pos, block_tokens, compare_upto):
    nonlocal cache
    t = block_tokens.shape[1]
    idx = pos[:, None] + np.arange(t)  # [B, T] image positions
    logits, hidden, cache = decode(jnp.asarray(block_tokens), jnp.asarray(PREFIX + idx), cache)
    logits, hidden = np.asarray(logits), np.asarray(hidden)
    for b in range(BATCH):
      for j in range(t):
        i = idx[b, j] + 1  # the state at image position i - 1 predicts token i
        if idx[b, j] < compare_upto[b] and i < N:
          np.testing.assert_allclose(logits[b, j], full_logits[b, i], atol=TOL,
                                     err_msg=f'sample {b}, token {i}')
          np.testing.assert_allclose(hidden[b, j], full_hidden[b, i], atol=TOL)
          checked[b, i] = True

  # A 7-token draft block of which each sample accepts a different prefix; the rejected
  # entries are junk tokens that stay in the cache and must be masked out from now on.
  accepted = np.array([0, 2, 5])
  junk = (padded[:, :7] + 7) % 16
  draft = np.where(np.arange(7) < accepted[:, None], padded[:, :7], junk)
  run_block(np.zeros(BATCH, int), draft, accepted)
  cache = cache.commit(jnp.asarray(PREFIX + accepted))

  pos = accepted.copy()
  for t in (1, 3, 7, 1, 3, 7):
    idx = pos[:, None] + np.arange(t)
    run_block(pos, np.take_along_axis(padded, idx, 1), np.full(BATCH, 10 ** 6))
    pos = pos + t
    cache = cache.commit(jnp.asarray(PREFIX + pos))
  checked[:, 0] = True  # from the prefill
  assert checked.all(), checked


def test_tree_block_mask(model, data, fns):
  """Two sibling drafts in one block: each sees only its ancestors (a draft tree)."""
  tokens, labels = data
  cond, prefill, decode = fns
  cache = model.init_cache(BATCH, extra_slots=EXTRA)
  _, _, cache = prefill(cond(labels), cache)
  cache = cache.commit(jnp.full((BATCH,), PREFIX))
  start = 3
  _, _, cache = decode(tokens[:, :start], jnp.broadcast_to(PREFIX + jnp.arange(start),
                                                            (BATCH, start)), cache)
  cache = cache.commit(jnp.full((BATCH,), PREFIX + start))

  # Block a, b1, b2, c: b1 and b2 are alternatives for position start + 1, c follows b2.
  a, b1, b2, c = (tokens[:, start], (tokens[:, start + 1] + 5) % 16, tokens[:, start + 1],
                  tokens[:, start + 2])
  block = jnp.stack([a, b1, b2, c], 1)
  tree = jnp.array([[1, 0, 0, 0],
                    [1, 1, 0, 0],
                    [1, 0, 1, 0],
                    [1, 0, 1, 1]], bool)
  slots = jnp.broadcast_to(PREFIX + start + jnp.arange(4), (BATCH, 4))
  positions = jnp.broadcast_to(PREFIX + start + jnp.array([0, 1, 1, 2]), (BATCH, 4))
  rope_pos = model.slot_rows_cols(positions)
  tree_logits, _, _ = decode(block, slots, cache, tree, rope_pos)

  def chain(*toks):  # the same tokens decoded as a plain causal block
    t = len(toks)
    return decode(jnp.stack(toks, 1), jnp.broadcast_to(PREFIX + start + jnp.arange(t),
                                                       (BATCH, t)), cache)[0]
  via_b1, via_b2 = chain(a, b1), chain(a, b2, c)
  np.testing.assert_allclose(tree_logits[:, 0], via_b2[:, 0], atol=TOL)
  np.testing.assert_allclose(tree_logits[:, 1], via_b1[:, 1], atol=TOL)
  np.testing.assert_allclose(tree_logits[:, 2], via_b2[:, 1], atol=TOL)
  np.testing.assert_allclose(tree_logits[:, 3], via_b2[:, 2], atol=TOL)
  assert not np.allclose(via_b1[:, 1], via_b2[:, 1])  # the siblings do differ


def test_rope_score_depends_only_on_2d_offset():
  head_dim, base = 16, 10.0
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, head_dim)), jnp.float32) for _ in range(2))

  def score(p, r):  # q at (row, col) p, k at (row, col) r
    rows, cols = jnp.array([[p[0], r[0]]]), jnp.array([[p[1], r[1]]])
    angles = layers.rope_angles(rows, cols, head_dim, base)  # [1, 2, head_dim / 2]
    return float(jnp.sum(layers.apply_rope(q, angles[:, :1]) * layers.apply_rope(k, angles[:, 1:])))

  for offset in [(0, 1), (1, 0), (2, -3), (-1, 4)]:
    scores = [score((y, x), (y + offset[0], x + offset[1]))
              for y, x in [(0, 0), (3, 7), (5, 1), (-2, -1)]]  # negative = prefix positions
    np.testing.assert_allclose(scores, scores[0], rtol=1e-5, atol=1e-5)
  # Row and column offsets act differently (axial 2D, not one raster index).
  assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3
  assert abs(score((0, 0), (0, 1)) - score((0, 0), (1, 0))) > 1e-3


def test_rope_angles_rejects_bad_head_dim():
  with pytest.raises(ValueError, match='multiple of 4'):
    layers.rope_angles(jnp.zeros((1, 1)), jnp.zeros((1, 1)), 6, 10.0)


def test_slot_positions(model):
  rows, cols = model.slot_rows_cols(jnp.arange(PREFIX + N))
  w = GRID[1]
  np.testing.assert_array_equal(rows[PREFIX:], np.arange(N) // w)
  np.testing.assert_array_equal(cols[PREFIX:], np.arange(N) % w)
  # Prefix slots get their own positions, none equal to an image token's.
  assert set(zip(rows[:PREFIX].tolist(), cols[:PREFIX].tolist())).isdisjoint(
      zip(rows[PREFIX:].tolist(), cols[PREFIX:].tolist()))


def test_heads_shapes(model, params, full, data):
  tokens, _ = data
  heads = heads_lib.NeighbourHeads(num_horizontal=3, num_vertical=2, dim=model.dim, mlp_dim=16)

  @jax.jit
  def run(hidden):
    emb = model.apply({'params': params}, tokens, method=model.embed_tokens)
    head_params = heads.init(jax.random.key(1), hidden, emb)['params']
    hor, ver = heads.apply({'params': head_params}, hidden, emb)
    logits = model.apply({'params': params}, hor, method=model.logits_from_hidden)
    one = heads.apply({'params': head_params}, hidden[0, 5], emb[0, 5])
    return hor, ver, logits, one

  hor, ver, logits, one = run(full[1])
  assert hor.shape == (BATCH, N, 3, model.dim) and ver.shape == (BATCH, N, 2, model.dim)
  assert logits.shape == (BATCH, N, 3, model.vocab_size)
  # One position at a time gives the same as the batched call.
  assert one[0].shape == (3, model.dim) and one[1].shape == (2, model.dim)
  np.testing.assert_allclose(one[0], hor[0, 5], atol=TOL)
  np.testing.assert_allclose(one[1], ver[0, 5], atol=TOL)


def test_neighbour_targets_align_with_the_grid():
  h, w = GRID
  heads = heads_lib.NeighbourHeads(num_horizontal=3, num_vertical=2, dim=8)
  x = jnp.arange(N)[None]  # value = raster index
  target, valid = heads_stage.neighbour_targets(x, GRID, heads)
  assert target.shape == (1, N, 5) and valid.shape == (N, 5)
  for i in range(N):
    y, c = divmod(i, w)
    for k in range(3):
      assert bool(valid[i, k]) == (c + k + 1 < w)
      if valid[i, k]:
        assert int(target[0, i, k]) == y * w + c + k + 1
    for k in range(2):
      assert bool(valid[i, 3 + k]) == (y + k + 1 < h)
      if valid[i, 3 + k]:
        assert int(target[0, i, 3 + k]) == (y + k + 1) * w + c


def test_kv_buckets_read_the_cache_only_as_far_as_a_query_sees(model, params, data, fns):
  """The bucket holds the last visible slot of the batch; reading fewer slots changes no
  logit (the ragged-block test above runs through every bucket of this model's cache)."""
  assert transformer.kv_bucket_sizes(202, 4) == (56, 104, 152, 202)
  assert transformer.kv_bucket_sizes(16, 4) == (8, 16)  # at least 8 slots per bucket
  assert transformer.kv_bucket_sizes(202, 1) == (202,)
  sizes = (8, 16, 24, 30)
  mask = np.zeros((2, 3, 30), bool)
  for last, bucket in ((1, 0), (8, 0), (9, 1), (17, 2), (25, 3), (30, 3)):
    m = mask.copy()
    m[1, 2, last - 1] = True
    assert int(transformer.kv_bucket(jnp.asarray(m), sizes)) == bucket, last
  tokens, labels = data
  cond, prefill, _ = fns
  outs = []
  for buckets in (1, 4):
    m = model.clone(kv_buckets=buckets)
    decode = jax.jit(lambda t, s, c, m=m: m.apply({'params': params}, t, s, c,
                                                  method=m.decode))
    _, _, cache = prefill(cond(labels), m.init_cache(BATCH, extra_slots=EXTRA))
    cache = cache.commit(jnp.full((BATCH,), PREFIX))
    outs.append(decode(tokens[:, :3], PREFIX + jnp.broadcast_to(jnp.arange(3), (BATCH, 3)),
                       cache)[0])
  np.testing.assert_allclose(outs[0], outs[1], atol=TOL)
