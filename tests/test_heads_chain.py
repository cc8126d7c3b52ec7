"""Chain heads (models/heads.py `chain`): each head also sees the token left of its target.
Training feeds the data token there, decoding the draft made just before it: fed the
drafts as data, training's distributions are decoding's. Speculative decoding through a
chain stays exact (greedy equality in test_heads_context.py, the sampled distribution in
test_decoding_distribution.py), and a warm start from heads without it changes nothing
until it trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from ssd_jax import pretrained
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
  return helpers.heads_bundle(VOCAB, GRID, context=2, chain=True, seed=3)


def test_left_index():
  left, ok = heads_lib.left_index((3, 4), num_horizontal=2, num_vertical=1)
  # source (1, 1) = 5: horizontal 1's left is its source (not fed); horizontal 2 -> target
  # (1, 3), left (1, 2) = 6; vertical -> target (2, 1), left (2, 0) = 8.
  assert ok[5].tolist() == [False, True, True] and left[5, 1:].tolist() == [6, 8]
  assert not ok[4, 2]       # vertical target (2, 0): column 0 has no left neighbour
  assert not ok[6, 1]       # horizontal 2 target (1, 4): off the grid
  assert not ok[9, 2]       # vertical target (3, 1): off the grid


def test_chain_drafts_are_what_training_fed(tiny):
  """Put each pass's drafts into the grid as data: training's q there is the q decoding
  drew them from, for every head choice (horizontal, vertical, column 0) and every row."""
  h, w = GRID
  n_tok, b, k = h * w, len(LABELS), 4
  tokens = np.random.default_rng(0).integers(0, VOCAB, (b, n_tok)).astype(np.int32)
  hidden, _ = helpers.heads_teacher_forced(tiny, tokens, LABELS)
  target = target_lib.Target(tiny.model, sampling_lib.Sampling(temperature=1.0, cfg_scale=1.0))
  drafter = drafts.HeadDrafter(target, tiny.stage('heads').module, horizontal_first=2)
  params = {'ar': tiny.params, 'heads': tiny.stage('heads').params}
  keys = engine.image_keys(0, 0, b)
  checked = {'horizontal': 0, 'vertical': 0}
  for n in range(1, n_tok):
    q, valid, draft = map(np.asarray, drafter.block(
        params, jnp.asarray(tokens), hidden, jnp.full((b,), n), k, keys))
    fed = tokens.copy()
    span = min(k, n_tok - n)
    fed[:, n:n + span] = draft[:, :span]
    _, q_train = helpers.heads_teacher_forced(tiny, fed, LABELS)
    last = n - 1
    for d in range(1, span + 1):
      pos = last + d
      if not valid[0, d - 1]:
        continue
      above = pos - w
      right = min(2, w - 1 - above % w)
      ver_ok = 0 <= above and above + right <= last
      if d <= 3 and pos // w == last // w and (d <= 2 or not ver_ok):
        want, kind = q_train[:, last, d - 1], 'horizontal'
      else:
        want, kind = q_train[:, above, 3], 'vertical'
      checked[kind] += 1
      np.testing.assert_allclose(q[:, d - 1], want, atol=2e-5, err_msg=f'n={n} d={d}')
  assert min(checked.values()) > 5, checked
  for y in range(1, h):
    q, row = map(np.asarray, drafter.row(params, jnp.asarray(tokens), hidden,
                                         jnp.full((b,), y), keys))
    assert (row[:, 0] == tokens[:, y * w]).all()   # the chain starts at the committed token
    fed = tokens.copy()
    fed[:, y * w:(y + 1) * w] = row
    _, q_train = helpers.heads_teacher_forced(tiny, fed, LABELS)
    np.testing.assert_allclose(q[:, 1:], q_train[:, (y - 1) * w + 1:y * w, 3], atol=2e-5)


def test_row_drafts_follow_their_left_neighbour(tiny):
  """The chain is real: changing token (y, 0) changes the drafts after it."""
  h, w = GRID
  tokens = np.random.default_rng(1).integers(0, VOCAB, (len(LABELS), h * w)).astype(np.int32)
  hidden, _ = helpers.heads_teacher_forced(tiny, tokens, LABELS)
  target = target_lib.Target(tiny.model, sampling_lib.Sampling(temperature=1.0, cfg_scale=1.0))
  drafter = drafts.HeadDrafter(target, tiny.stage('heads').module)
  params = {'ar': tiny.params, 'heads': tiny.stage('heads').params}
  y = jnp.full((len(LABELS),), 2)
  keys = engine.image_keys(0, 0, len(LABELS))
  q, _ = drafter.row(params, jnp.asarray(tokens), hidden, y, keys)
  other = tokens.copy()
  other[:, 2 * w] = (other[:, 2 * w] + 1) % VOCAB
  q_other, _ = drafter.row(params, jnp.asarray(other), hidden, y, keys)
  assert np.abs(np.asarray(q[:, 1]) - np.asarray(q_other[:, 1])).max() > 1e-4


def test_warm_start_into_a_chain_changes_nothing_until_trained():
  plain = helpers.heads_bundle(VOCAB, GRID, context=2, seed=1)
  stage = plain.stage('heads')
  chained = heads_lib.NeighbourHeads(num_horizontal=3, num_vertical=1, dim=stage.module.dim,
                                     mlp_dim=32, context=2, chain=True)
  init = helpers.init_params(chained, jax.random.key(9),
                             *pretrained.init_args('heads', chained))
  warm = heads_stage.warm_start(init, stage.params, 'trained-heads')
  # Horizontal head 1 takes no left token: its W0 keeps its shape.
  assert warm['horizontal_1']['w0']['kernel'].shape == stage.params['horizontal_1']['w0'][
      'kernel'].shape
  assert warm['vertical_1']['w0']['kernel'].shape[0] == (
      stage.params['vertical_1']['w0']['kernel'].shape[0] + stage.module.dim)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (2, GRID[0] * GRID[1])))
  labels = jnp.asarray([0, 1])
  want, _, _ = heads_stage.head_outputs(plain.model, stage.module, plain.params, stage.params,
                                        tokens, labels)
  got, _, _ = heads_stage.head_outputs(plain.model, chained, plain.params, warm, tokens,
                                       labels)
  np.testing.assert_allclose(got, want, atol=1e-6)
