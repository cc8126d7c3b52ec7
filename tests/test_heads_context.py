"""Neighbour heads with context (models/heads.py `context`): the positions training feeds
them are the ones decoding feeds them, a warm start from heads without context changes
nothing until it trains, and greedy decoding through them still equals AR."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from ssd_jax.decoding import drafts
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import heads as heads_lib
from ssd_jax.training import heads_stage

GRID = (4, 5)
VOCAB = 16
LABELS = np.array([0, 1, 2, 1], np.int32)


@pytest.fixture(scope='module')
def tiny():
  return helpers.heads_bundle(VOCAB, GRID, context=2, seed=3)


def test_context_index():
  idx, ok = heads_lib.context_index((3, 4), num_horizontal=2, num_vertical=1, context=2)
  # source (1, 1) = 5: horizontal 1 -> (0, 2), (0, 3) = 2, 3; horizontal 2 -> (0, 3) and
  # (0, 4) off the grid; vertical -> (1, 2), (1, 3) = 6, 7.
  assert idx[5, 0].tolist() == [2, 3] and ok[5, 0].all()
  assert idx[5, 1, 0] == 3 and ok[5, 1].tolist() == [True, False]
  assert idx[5, 2].tolist() == [6, 7] and ok[5, 2].all()
  assert not ok[2, :2].any() and ok[2, 2].tolist() == [True, False]  # row 0: nothing above
  assert not ok[7, 2].any()                        # last column: nothing to its right


def test_decoding_feeds_what_training_fed(tiny):
  """drafter.block / drafter.row give the draft distributions head_outputs trains on, at
  every committed length and row: the context positions agree between the two."""
  h, w = GRID
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (len(LABELS), h * w)).astype(np.int32)
  hidden, q_train = helpers.heads_teacher_forced(tiny, tokens, LABELS)
  target = target_lib.Target(tiny.model, sampling_lib.Sampling(temperature=1.0, cfg_scale=1.0))
  drafter = drafts.HeadDrafter(target, tiny.stage('heads').module, horizontal_first=2)
  params = {'ar': tiny.params, 'heads': tiny.stage('heads').params}
  keys = engine.image_keys(0, 0, len(LABELS))
  for n in range(1, h * w):
    q, valid, _ = drafter.block(params, jnp.asarray(tokens), hidden,
                                jnp.full((len(LABELS),), n), 4, keys)
    q, valid = np.asarray(q), np.asarray(valid)
    last = n - 1
    for d in range(1, 5):
      pos = last + d
      if not valid[0, d - 1]:
        continue
      above = pos - w
      right = min(2, w - 1 - above % w)               # context positions on the grid
      ver_ok = 0 <= above and above + right <= last   # ... all committed
      if d <= 3 and pos // w == last // w and (d <= 2 or not ver_ok):
        want = q_train[:, last, d - 1]                # horizontal head d at `last`
      else:
        assert ver_ok
        want = q_train[:, above, 3]                   # the vertical head above
      np.testing.assert_allclose(q[:, d - 1], want, atol=2e-5, err_msg=f'n={n} d={d}')
  for y in range(1, h):
    q, _ = drafter.row(params, jnp.asarray(tokens), hidden, jnp.full((len(LABELS),), y), keys)
    np.testing.assert_allclose(q, q_train[:, (y - 1) * w:y * w, 3], atol=2e-5)


def test_block_waits_for_the_right_neighbour(tiny):
  """A vertical draft whose context (y, x + 1), (y, x + 2) is not all committed is not
  made."""
  h, w = GRID
  tokens = np.zeros((1, h * w), np.int32)
  hidden = jnp.zeros((1, 1, h * w, tiny.model.dim))
  target = target_lib.Target(tiny.model, sampling_lib.Sampling(temperature=1.0, cfg_scale=1.0))
  drafter = drafts.HeadDrafter(target, tiny.stage('heads').module, horizontal_first=1)
  params = {'ar': tiny.params, 'heads': tiny.stage('heads').params}
  # Position (2, 1) = 2w + 1 is drafted from (1, 1) with context (1, 2), (1, 3).
  target_pos = 2 * w + 1
  for n, want in ((w + 2, False), (w + 3, False), (w + 4, True)):  # last = (1, 1) .. (1, 3)
    k = target_pos - n + 1
    _, valid, _ = drafter.block(params, jnp.asarray(tokens), hidden, jnp.array([n]), k,
                                engine.image_keys(0, 0, 1))
    assert bool(valid[0, k - 1]) == want, n


def test_warm_start_changes_nothing_until_trained():
  """Context heads started from trained heads without context draft exactly as they do."""
  plain = helpers.heads_bundle(VOCAB, GRID, seed=1)
  stage = plain.stage('heads')
  with_ctx = heads_lib.NeighbourHeads(num_horizontal=3, num_vertical=1, dim=stage.module.dim,
                                      mlp_dim=32, context=2)
  heads_dir = 'trained-heads'
  init = helpers.init_params(with_ctx, jax.random.key(9),
                             *heads_stage.pretrained.init_args('heads', with_ctx))
  warm = heads_stage.warm_start(init, stage.params, str(heads_dir))
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, GRID[0] * GRID[1])))
  labels = jnp.asarray([0, 1])
  want, _, _ = heads_stage.head_outputs(plain.model, stage.module, plain.params, stage.params,
                                        tokens, labels)
  got, _, _ = heads_stage.head_outputs(plain.model, with_ctx, plain.params, warm, tokens,
                                       labels)
  np.testing.assert_allclose(got, want, atol=1e-6)
  other = heads_lib.NeighbourHeads(num_horizontal=2, num_vertical=1, dim=stage.module.dim,
                                   mlp_dim=32, context=1)
  with pytest.raises(ValueError, match='init_from'):
    heads_stage.warm_start(helpers.init_params(
        other, jax.random.key(0), *heads_stage.pretrained.init_args('heads', other)),
                           stage.params, str(heads_dir))


@pytest.fixture(scope='module')
def tiny_chain():
  return helpers.heads_bundle(VOCAB, GRID, context=2, chain=True, seed=3)


@pytest.mark.parametrize('chain', [False, True])
@pytest.mark.parametrize('method,options', [
    ('speculative', {'draft_len': 4}), ('ssd', {'rounds': GRID[1] - 1})])
def test_greedy_with_context_heads_equals_ar(tiny, tiny_chain, chain, method, options):
  """Also with chain heads (test_heads_chain.py), whose drafts follow the one before."""
  tiny = tiny_chain if chain else tiny
  sampling = sampling_lib.Sampling(temperature=0.0, cfg_scale=2.0)
  want, _ = helpers.decode(tiny, 'ar', sampling, LABELS)
  got, stats = helpers.decode(tiny, method, sampling, LABELS, options=options)
  helpers.assert_greedy_equal(tiny, got, want, LABELS, 2.0)
  if method == 'speculative':
    assert stats['target_passes'].max() < GRID[0] * GRID[1]  # drafts were accepted
