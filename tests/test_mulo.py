"""MuLo-SD: islands, the two extremes of tau, the concurrent schedule, the training stages.

Properties: a hand-made rejection map grows and splits into the expected islands; tau = 0
returns the upsampled draft unchanged after one pass; tau > 1 resamples every position,
which is plain AR decoding token for token (greedy, and sampled with the same keys); the
passes equal 1 + the longest island's schedule; the stages lower their losses, resume,
and load into the Bundle; bad knob values are refused by name.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar as ar_config
from configs import mulo_draft as mulo_draft_config
from configs import mulo_upsampler as mulo_upsampler_config
from configs import tokenizer as tokenizer_config
from ssd_jax import pretrained
from ssd_jax import sample_job
from ssd_jax.decoding import codebook
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.methods import mulo
from ssd_jax.models import mulo as mulo_models
from ssd_jax.models import transformer
from ssd_jax.models import vq
from ssd_jax.training import ar_stage
from ssd_jax.training import loop
from ssd_jax.training import mulo_stages
from ssd_jax.training import stages
import helpers  # pylint: disable=g-bad-import-order
from test_data import write_fashion_idx  # pylint: disable=g-bad-import-order
from test_training import read_metrics, without_evaluation  # pylint: disable=g-bad-import-order

GRID = (4, 6)
VOCAB = 16
K = 8  # codebook neighbours pooled (mulo's default, 32, exceeds this codebook)
GREEDY = sampling_lib.Sampling(temperature=0.0, cfg_scale=2.0)
SAMPLED = sampling_lib.Sampling(temperature=1.0, cfg_scale=2.0)


# --- islands ------------------------------------------------------------------------------

def islands(rows, radius):
  """A map drawn with '#' (rejected) -> the island map drawn with letters, '.' elsewhere."""
  mask = jnp.asarray([[c == '#' for c in row] for row in rows])[None]
  grown = mulo.grow(mask, radius)
  lab = np.asarray(mulo.label_islands(grown))[0]
  names = {v: chr(ord('a') + i) for i, v in enumerate(sorted(set(lab) - {mask.size}))}
  flat = [names.get(v, '.') for v in lab]
  w = len(rows[0])
  return [''.join(flat[i:i + w]) for i in range(0, len(flat), w)]


def test_islands_are_connected_components():
  rows = ['#.....',
          '.#..#.',
          '....#.',
          '#.....',
          '....##']
  # Diagonal neighbours are separate islands; 4-adjacent ones join.
  assert islands(rows, 0) == ['a.....',
                              '.b..c.',
                              '....c.',
                              'd.....',
                              '....ee']


def test_islands_join_across_a_row_end():
  # (0, 5) and (1, 0) are raster neighbours: the second is predicted from the first.
  assert islands(['.....#', '#.....', '......'], 0) == ['.....a', 'a.....', '......']


def test_radius_grows_before_the_split():
  rows = ['#.......',
          '........',
          '........',
          '......#.',
          '........']
  assert islands(rows, 1) == ['aa......',
                              'aa......',
                              '.....bbb',
                              '.....bbb',
                              '.....bbb']
  # Radius 2: the two squares do not touch in 2D, but (1, 7) touches (2, 0) in raster order.
  assert islands(rows, 2) == ['aaa.....',
                              'aaa.aaaa',
                              'aaa.aaaa',
                              '....aaaa',
                              '....aaaa']


def test_max_islands_bounds_a_checkerboard():
  board = np.indices(GRID).sum(0) % 2 == 0
  lab = np.asarray(mulo.label_islands(jnp.asarray(board)[None]))[0]
  assert len(set(lab) - {board.size}) <= mulo.max_islands(GRID, 0)


# --- decoding on tiny random models ----------------------------------------------------------

init = helpers.init_params  # jitted: eager init dispatches (and compiles) op by op


def tiny_bundle(seed=0):
  """A random target (sharpened, context-dependent), tokenizer codebook, drafter on the 2x3
  pooled grid and upsampler."""
  keys = jax.random.split(jax.random.key(seed), 4)
  labels = jnp.zeros((1,), jnp.int32)
  model = transformer.Transformer(vocab_size=VOCAB, num_classes=3, grid=GRID, num_layers=2,
                                  dim=32, num_heads=2, mlp_dim=64)
  params = init(model, keys[0], jnp.zeros((1, GRID[0] * GRID[1]), jnp.int32), labels)
  params['lm_head']['kernel'] = params['lm_head']['kernel'] * 12.0
  params['token_embed']['embedding'] = params['token_embed']['embedding'] * 25.0
  tok = vq.VQTokenizer(codebook_size=VOCAB, code_dim=4, channels=8, num_res_blocks=1)
  tok_params = {'codebook': jax.random.normal(keys[1], (VOCAB, 4))}  # mulo reads only codes
  drafter = transformer.Transformer(vocab_size=VOCAB, num_classes=3, grid=(2, 3),
                                    num_layers=1, dim=16, num_heads=2, mlp_dim=32)
  draft_params = init(drafter, keys[2], jnp.zeros((1, 6), jnp.int32), labels)
  up = mulo_models.Upsampler(vocab_size=VOCAB, num_classes=3, grid=GRID, num_layers=1,
                             dim=16, num_heads=2, mlp_dim=32)
  up_params = init(up, keys[3], *mulo_models.upsampler_init_args(up))
  return helpers.bundle(model, params, tok, tok_params, mulo_draft=(drafter, draft_params),
                        mulo_upsampler=(up, up_params))


@pytest.fixture(scope='module')
def bundle():
  return tiny_bundle()


@pytest.fixture(scope='module')
def mesh():
  return helpers.one_device_mesh()


def generate(bundle, mesh, method, sampling, num_images=8, seed=3, **options):
  """engine.generate; options: the method's fields (e.g. tau=1.5), else its defaults
  (mulo's k: K)."""
  if method == 'mulo':
    options.setdefault('k', K)
  return engine.generate(bundle, method, sampling, num_images=num_images,
                         batch_size=num_images, seed=seed, mesh=mesh, progress=False,
                         options=options or None)


def params_of(bundle):
  """The params mulo's builder takes: {'ar', 'mulo_draft', 'mulo_upsampler'}."""
  return {'ar': bundle.params, 'mulo_draft': bundle.stage('mulo_draft').params,
          'mulo_upsampler': bundle.stage('mulo_upsampler').params}


def decode(bundle, sampling, labels, keys, **options):
  """mulo's decoding function called directly (the per-sample stats engine sums away)."""
  options.setdefault('k', K)
  target = target_lib.Target(bundle.model, sampling)
  fn = jax.jit(mulo.build(bundle, target, mulo.Options(**options)))
  tokens, stats = fn(params_of(bundle), labels, keys)
  return np.asarray(tokens), jax.tree.map(np.asarray, stats)


def draft_of(bundle, sampling, labels, keys):
  target = target_lib.Target(bundle.model, sampling)
  fn = jax.jit(lambda p, l, k: mulo.draft_grid(target, bundle.stage('mulo_draft').module,
                                                bundle.stage('mulo_upsampler').module, p, l,
                                                k)[0])
  return np.asarray(fn(params_of(bundle), labels, keys))


LABELS = jnp.arange(8) % 3
KEYS = jax.random.split(jax.random.key(5), 8)


def test_tau_zero_keeps_the_draft(bundle):
  tokens, stats = decode(bundle, SAMPLED, LABELS, KEYS, tau=0.0)
  np.testing.assert_array_equal(tokens, draft_of(bundle, SAMPLED, LABELS, KEYS))
  assert int(stats['target_passes']) == 1
  assert (stats['accepted_drafts'] == GRID[0] * GRID[1]).all()
  assert int(stats['draft_passes']) == 6 + 1  # the 2x3 grid, then the upsampler


@pytest.mark.parametrize('sampling', [GREEDY, SAMPLED], ids=['greedy', 'sampled'])
def test_tau_above_one_resamples_everything_as_ar(bundle, mesh, sampling):
  """One island in raster order, each token seeing every earlier one: plain AR, with the
  same key per token as AR, so sampled tokens agree too."""
  ar = generate(bundle, mesh, 'ar', sampling)
  out = generate(bundle, mesh, 'mulo', sampling, tau=1.5)
  np.testing.assert_array_equal(out.tokens, ar.tokens)
  assert out.stats['target_passes'] == GRID[0] * GRID[1]  # verify + N - 1 (token 0 free)
  assert out.stats['lossless'] is False


def test_passes_follow_the_island_schedule(bundle):
  """Accepted positions keep their draft tokens; islands resampled concurrently take 1 +
  the longest island's positions (token 0 aside), one lane at a time 1 + all of them."""
  n = GRID[0] * GRID[1]
  target = target_lib.Target(bundle.model, GREEDY)
  params = params_of(bundle)
  neighbours = codebook.neighbours(bundle, 8)

  @jax.jit
  def rejection_map(params, labels, keys):  # what decode_mulo's verify pass rejects
    draft, _ = mulo.draft_grid(target, bundle.stage('mulo_draft').module,
                               bundle.stage('mulo_upsampler').module, params, labels, keys)
    probs, _ = mulo.verify(target, params['ar'], labels, draft,
                           target.init_cache(labels.shape[0]))
    return ~mulo.pooled_accept(probs, draft, neighbours, 0.9), draft

  rejected, draft = map(np.asarray, rejection_map(params, LABELS, KEYS))
  assert rejected.any() and (~rejected).any(), 'pick a tau that splits the draft'
  lab = np.asarray(mulo.label_islands(jnp.asarray(rejected).reshape(-1, *GRID)))
  sizes = [[np.sum((lab[b] == v) & (np.arange(n) > 0)) for v in set(lab[b]) - {n}]
           for b in range(len(LABELS))]
  assert max(len(s) for s in sizes) > 1, 'pick a tau that gives several islands'
  for lanes, schedule in ((0, lambda s: max(s, default=0)), (1, sum)):
    tokens, stats = decode(bundle, GREEDY, LABELS, KEYS, tau=0.9, k=8, radius=0,
                           lanes=lanes)
    for b in range(len(LABELS)):
      assert stats['sample_passes'][b] == 1 + schedule(sizes[b]), (lanes, b)
      np.testing.assert_array_equal(tokens[b][~rejected[b]], draft[b][~rejected[b]])
    assert stats['target_passes'] == stats['sample_passes'].max()


# --- knobs --------------------------------------------------------------------------------

@pytest.mark.parametrize('field,value', [('tau', -0.1), ('tau', float('nan')), ('k', -1),
                                         ('radius', -1), ('lanes', -2)])
def test_bad_knobs_are_refused_by_name(field, value):
  args = sample_job.SampleArgs(method='mulo', checkpoint='/nonexistent',
                               options={field: value})
  with pytest.raises(ValueError, match=f'--mulo_{field}='):
    sample_job.run(args)
  with pytest.raises(ValueError, match=f'--mulo_{field}='):
    registry.get('mulo').validate(mulo.Options(**{field: value}))


def test_build_refuses_what_does_not_fit(bundle, mesh):
  with pytest.raises(ValueError, match=f'--mulo_k={VOCAB} must be < {VOCAB}'):
    generate(bundle, mesh, 'mulo', GREEDY, k=VOCAB)
  bare = helpers.bundle(bundle.model, bundle.params, bundle.tokenizer,
                        bundle.tokenizer_params)
  with pytest.raises(ValueError, match='needs the mulo_draft/ stage'):
    generate(bare, mesh, 'mulo', GREEDY)
  only_drafter = helpers.bundle(bundle.model, bundle.params, bundle.tokenizer,
                                bundle.tokenizer_params, mulo_draft=(
                                    bundle.stage('mulo_draft').module,
                                    bundle.stage('mulo_draft').params))
  with pytest.raises(ValueError, match='needs the mulo_upsampler/ stage'):
    generate(only_drafter, mesh, 'mulo', GREEDY)


# --- training stages ------------------------------------------------------------------------

CONFIGS = {'tokenizer': tokenizer_config, 'ar': ar_config, 'mulo_draft': mulo_draft_config,
           'mulo_upsampler': mulo_upsampler_config}


def smoke_config(root, stage, **overrides):
  config = CONFIGS[stage].get_config('smoke')
  config.data.idx_dir = str(root / 'idx')
  config.data.data_dir = str(root / 'tfds')
  config.update(overrides)
  return config


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp('mulo_runs')
  write_fashion_idx(root / 'idx')
  workdir = str(root / 'work')
  with jax.threefry_partitionable(False):  # XLA:CPU compiles conv-kernel draws slowly
    stages.run(smoke_config(root, 'tokenizer'), workdir)
  for stage in ('mulo_draft', 'mulo_upsampler'):
    stages.run(smoke_config(root, stage, num_steps=6, log_every=1, checkpoint_every=3,
                            learning_rate=1e-2), workdir)
  return root, workdir


@pytest.mark.parametrize('stage', ['mulo_draft', 'mulo_upsampler'])
def test_stages_lower_their_loss_and_resume(workdir, stage, capsys):
  root, work = workdir
  stage_dir = os.path.join(work, stage)
  losses = [m['loss'] for m in read_metrics(stage_dir)]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  results = json.load(open(os.path.join(stage_dir, 'results.json')))
  assert results['step'] == 6 and 0 < results['val_bits_per_token'] < 12
  if stage == 'mulo_upsampler':
    assert 0 <= results['token_accuracy'] <= 1 and 0 <= results['copy_token_accuracy'] <= 1
  capsys.readouterr()
  config = smoke_config(root, stage, num_steps=8, log_every=1, checkpoint_every=4,
                        learning_rate=1e-2)
  loop.train(config, work, without_evaluation(mulo_stages.make_stage(config, work)))
  out = capsys.readouterr().out
  assert re.search(r'resumed from \S+ at step 6\n', out), out
  assert read_metrics(stage_dir)[-1]['step'] == 8


def test_bundle_loads_the_stages_and_samples(workdir, mesh):
  root, work = workdir
  config = smoke_config(root, 'ar', num_steps=2)
  loop.train(config, work, without_evaluation(ar_stage.make_stage(config, work)))
  bundle = pretrained.load(work, stages=registry.get('mulo').needs)
  assert bundle.stage('mulo_draft').module.grid == (7, 7)
  assert bundle.stage('mulo_upsampler').module.grid == (14, 14)
  out = generate(bundle, mesh, 'mulo', SAMPLED, num_images=2)
  assert out.tokens.shape == (2, 14, 14)
  assert 1 <= out.stats['target_passes'] <= 14 * 14
