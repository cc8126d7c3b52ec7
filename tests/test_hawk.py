"""Hawk (issue 9): the 2D draft model, the `hawk_draft` stage and the lossless `hawk` method.

Properties, on tiny random models: the drafter's decoding path (gathered windows) computes
what training computes (dense window masks) and sees nothing outside its window; the
chain, carrying only its own drafts, sees them as if committed (past the grid's end too);
the tree mask lets every node see exactly its ancestors, and the accepted path's
keys/values land at their canonical slots; greedy hawk is greedy AR token for token;
sampled hawk has the target's exact distribution (enumerated over every grid of a 2x3,
4-token model: every check of helpers.distribution_report passes), and a broken
multi-draft rule fails one of them; the stage lowers its loss and resumes.
"""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import hawk_draft as hawk_config
from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.data import pipeline
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import engine
from ssd_jax.decoding import keys as keys_lib
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import state as state_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.methods import hawk
from ssd_jax.models import hawk as hawk_model
from ssd_jax.models import transformer
from ssd_jax.training import checkpoint
from ssd_jax.training import stages
import helpers  # pylint: disable=g-bad-import-order
from test_data import write_fashion_idx  # pylint: disable=g-bad-import-order
import test_training as training_test  # pylint: disable=g-bad-import-order

Sampling = sampling_lib.Sampling

LABELS = np.array([0, 1, 2, 1, 0, 2, 2, 1], np.int32)  # batch 8, mixed classes
DRAFT_LEN = 3  # a tree of 3 + 6 drafts


def tiny_bundle(grid, vocab, dim, seed=0, sharpen=8.0, embed_scale=25.0, out_scale=0.0):
  """A random 2-layer target and Hawk drafter as a Bundle the engine accepts.

  `sharpen` peaks the target's logits (no argmax near-ties between a one-token pass and a
  tree pass), large token embeddings make them depend on the context, and `out_scale`
  shrinks the drafter's correction: at 0 it drafts the source's own state (left or above),
  which this repetitive random model accepts often, with both kinds of draft.
  """
  model = helpers.tiny_model(vocab, grid, num_layers=2, dim=dim, num_heads=2, mlp_dim=2 * dim)
  drafter = hawk_model.HawkDrafter(dim=dim, grid=grid, width=16, num_heads=2, mlp_dim=32,
                                   num_layers=1, window_rows=1, window_cols=1)
  k_model, k_hawk = jax.random.split(jax.random.key(seed))
  params = helpers.model_params(model, k_model, sharpen, embed_scale)
  hawk_params = helpers.init_params(drafter, k_hawk, *pretrained.init_args('hawk_draft',
                                                                            drafter))
  hawk_params['out']['kernel'] = hawk_params['out']['kernel'] * out_scale
  return helpers.bundle(model, params, hawk_draft=(drafter, hawk_params))


def run(bundle, method, sampling, labels, keys, **options):
  """(tokens, stats) as numpy through engine.build_decoder on one device; options: the
  method's fields (e.g. draft_len=3)."""
  return helpers.decode(bundle, method, sampling, labels, keys, options or None)


@pytest.fixture(scope='module')
def tiny():
  return tiny_bundle((4, 5), 16, 32)


# --- the draft model ---------------------------------------------------------------------

def test_drafter_decoding_path_equals_training_path_and_stays_in_its_window(tiny):
  drafter, grid, b = tiny.stage('hawk_draft').module, tiny.model.grid, 2
  n, dim = grid[0] * grid[1], drafter.dim
  keys = jax.random.split(jax.random.key(0), 3)
  # A full-strength correction: the draft must depend on the window through attention.
  params = dict(tiny.stage('hawk_draft').params, out={'kernel': jax.random.normal(keys[0], (16, dim))})
  hidden, emb = (jax.random.normal(k, (b, n, dim)) for k in keys[1:])
  apply = jax.jit(lambda *a, method=None: drafter.apply({'params': params}, *a, method=method),
                  static_argnums=(5,), static_argnames='method')
  hor, ver = apply(hidden, emb)
  pos = jnp.broadcast_to(jnp.arange(n), (b, n))
  take = lambda x, idx: jnp.take_along_axis(
      x, idx.reshape(b, -1)[..., None], 1).reshape(idx.shape + (dim,))
  for vertical, want, first in ((False, hor, 1), (True, ver, grid[1])):
    src = pos - (grid[1] if vertical else 1)
    idx, valid = hawk_model.window_positions(pos, grid, drafter.offsets, vertical)
    got = apply(take(hidden, src), take(emb, src), take(hidden, idx), take(emb, idx), pos,
                vertical, method=drafter.draft)
    np.testing.assert_allclose(got[:, first:], want[:, first:], atol=1e-5)
    # Local: changing every position outside j's window (and source) leaves j's draft alone.
    j = 2 * grid[1] + 2
    outside = np.ones(n, bool)
    outside[np.asarray(idx[0, j])[np.asarray(valid[0, j])]] = False
    outside[int(src[0, j])] = False
    noisy = jnp.where(outside[None, :, None], hidden + 3.0, hidden)
    again = apply(noisy, emb, method=drafter.vertical if vertical else drafter.horizontal)
    np.testing.assert_allclose(again[:, j], want[:, j], atol=1e-5)
    assert not np.allclose(again, want)


def test_chain_sees_its_drafts_as_if_committed(tiny):
  """The chain carries only its own drafts; each step must still see the earlier ones
  exactly as if written into the buffers at n, n+1, ... (dropped past the grid's end),
  the buffers' other entries, stale ones included, as they are."""
  drafter, grid, b, k = tiny.stage('hawk_draft').module, tiny.model.grid, 6, 4
  n_tok = grid[0] * grid[1]
  keys = jax.random.split(jax.random.key(1), 3)
  # A full-strength correction, so each draft depends on its window and not only its source.
  out = {'kernel': jax.random.normal(keys[0], (16, drafter.dim))}
  params = {'ar': tiny.params, 'hawk_draft': dict(tiny.stage('hawk_draft').params, out=out)}
  target = target_lib.Target(tiny.model, Sampling(temperature=1.0, cfg_scale=3.0))
  decoder = hawk.HawkDecoder(target, drafter, k)
  image_keys = engine.image_keys(0, 0, b)
  s = state_lib.start(target, params['ar'], LABELS[:b], image_keys)
  # Random buffers everywhere (stale entries past the length too); chains that start
  # mid-grid, end exactly at the grid's end, run past it, and a finished sample.
  s = s.replace(tokens=jax.random.randint(keys[1], s.tokens.shape, 0, 16),
                hidden=jax.random.normal(keys[2], s.hidden.shape),
                length=jnp.array([1, 7, 16, 18, 19, n_tok]), passes=jnp.int32(5))
  tokens, qs = decoder._chain(params, image_keys, s)                      # [B, K], [B, K, V]
  bidx, ref = jnp.arange(b), s
  for d in range(k):
    pos = s.length + d
    pred, q = decoder._draft(params, ref, pos[:, None], pos[:, None] - 1, vertical=False)
    np.testing.assert_allclose(qs[:, d], q[:, 0], atol=1e-6)
    tok = target.sample(keys_lib.pass_keys(image_keys, s.passes, keys_lib.Stream.CHAIN, d),
                        q[:, 0])
    np.testing.assert_array_equal(tokens[:, d], tok)
    ref = ref.replace(tokens=ref.tokens.at[bidx, pos].set(tok, mode='drop'),
                      hidden=ref.hidden.at[:, bidx, pos].set(pred[:, :, 0], mode='drop'))


# --- the tree ----------------------------------------------------------------------------

def test_tree_layout_and_ancestor_mask():
  parent, depth, vertical, h_child, v_child = hawk.tree(2)
  # root; spine H0 -> H1; tail V0 -> V1 from the root; tail V1 from H0.
  np.testing.assert_array_equal(parent, [-1, 0, 1, 0, 3, 1])
  np.testing.assert_array_equal(depth, [0, 1, 2, 1, 2, 2])
  np.testing.assert_array_equal(vertical, [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(h_child, [1, 2, -1, -1, -1, -1])
  np.testing.assert_array_equal(v_child, [3, 5, -1, 4, -1, -1])
  assert len(hawk.tree(4)[0]) == 1 + 4 + 4 * 5 // 2
  want = np.array([[1, 0, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0, 0],
                   [1, 1, 1, 0, 0, 0],
                   [1, 0, 0, 1, 0, 0],
                   [1, 0, 0, 1, 1, 0],
                   [1, 1, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(hawk.ancestor_mask(parent), want)
  # In the cache: committed slots [0, length) plus exactly the ancestors' slots.
  length, start = 5, 7
  slots = jnp.asarray(start + np.arange(6))[None]
  mask = np.asarray(transformer.cache_mask(slots, jnp.array([length]), 16, jnp.asarray(want)))
  for t in range(6):
    np.testing.assert_array_equal(np.flatnonzero(mask[0, t]), list(range(length)) + list(
        start + np.flatnonzero(want[t])))


def test_tree_pass_equals_each_path_and_compaction_puts_the_path_in_place(tiny):
  """A hand-built tree with a branch at every level, against each root-to-leaf path run
  as a plain causal block; then the accepted path's keys/values are compacted."""
  model, params = tiny.model, tiny.params
  width = model.grid[1]
  parent = np.array([-1, 0, 0, 1, 1, 2, 5])  # leaves 3, 4, 6
  depth = np.array([0, 1, 1, 2, 2, 2, 3])
  rng = np.random.default_rng(0)
  b, n = 2, 4  # n committed tokens; the root is token n - 1
  tokens = jnp.asarray(rng.integers(0, 16, (b, 7)))
  prefix = model.prefix_len
  apply = jax.jit(lambda *a: model.apply({'params': params}, *a, method=model.decode))
  cond = model.apply({'params': params}, jnp.array([0, 2]), method=model.condition)
  _, _, cache = model.apply({'params': params}, cond, model.init_cache(b, 8),
                            method=model.prefill)
  history = jnp.asarray(rng.integers(0, 16, (b, n - 1)))
  _, _, cache = apply(history, prefix + jnp.broadcast_to(jnp.arange(n - 1), (b, n - 1)),
                      cache.commit(jnp.full((b,), prefix)))
  cache = cache.commit(jnp.full((b,), prefix + n - 1))
  pos = n - 1 + depth
  tree_logits, _, tree_cache = apply(
      tokens, jnp.broadcast_to(prefix + n - 1 + jnp.arange(7), (b, 7)), cache,
      jnp.asarray(hawk.ancestor_mask(parent)),
      (jnp.asarray(pos // width)[None].repeat(b, 0), jnp.asarray(pos % width)[None].repeat(b, 0)))
  for leaf in (3, 4, 6):
    path = [leaf]
    while parent[path[-1]] >= 0:
      path.append(parent[path[-1]])
    path = path[::-1]
    t = len(path)
    logits, _, path_cache = apply(tokens[:, path], jnp.broadcast_to(
        prefix + n - 1 + jnp.arange(t), (b, t)), cache)
    np.testing.assert_allclose(tree_logits[:, path], logits, atol=1e-4)
  # Accept the path root -> 2 -> 5 -> 6 (its nodes sit at tree slots 2, 5, 6).
  target = target_lib.Target(model, Sampling())
  decoder = hawk.HawkDecoder(target, tiny.stage('hawk_draft').module, 3)
  path = jnp.array([[0, 2, 5, 6]] * b)
  compact = decoder._compact(tree_cache, jnp.full((b,), n), path, jnp.full((b,), 3))
  canonical = prefix + n - 1 + np.arange(4)
  for got, want in ((compact.k, path_cache.k), (compact.v, path_cache.v)):
    np.testing.assert_allclose(got[..., canonical, :], want[..., canonical, :], atol=1e-5)


# --- greedy hawk == greedy AR --------------------------------------------------------------

@pytest.mark.parametrize('cfg_scale', [1.0, 3.0])
def test_greedy_hawk_equals_ar(tiny, cfg_scale):
  sampling = Sampling(temperature=0.0, cfg_scale=cfg_scale)
  keys = engine.image_keys(0, 0, len(LABELS))
  want, _ = run(tiny, 'ar', sampling, LABELS, keys)
  got, stats = run(tiny, 'hawk', sampling, LABELS, keys, draft_len=DRAFT_LEN)
  helpers.assert_greedy_equal(tiny, got, want, LABELS, cfg_scale, what=f'hawk cfg {cfg_scale}')
  accepted, vertical = stats['accepted_drafts'].sum(), stats['accepted_vertical'].sum()
  total = len(LABELS) * (tiny.model.num_tokens - 1)
  print(f'cfg {cfg_scale}: accepted {accepted} of {total} tokens ({vertical} vertical), '
        f'passes {stats["sample_passes"].tolist()}')
  # Informative only if drafts of both kinds stood (a vertical one is always moved to its
  # canonical slot, which later tokens then read) and others fell.
  assert 0 < vertical < accepted < total
  assert stats['target_passes'] == stats['sample_passes'].max() < tiny.model.num_tokens


def test_bad_knobs_are_refused(tiny):
  for value in (0, 9):
    with pytest.raises(ValueError, match=f'--hawk_draft_len={value} must be in '
                       rf'\[1, {hawk.MAX_DRAFT_LEN}\]'):
      registry.get('hawk').validate(hawk.Options(draft_len=value))
    with pytest.raises(ValueError, match=f'--hawk_draft_len={value}'):
      engine.resolve_options(registry.get('hawk'), {'draft_len': value}, tiny)
  no_drafter = helpers.bundle(tiny.model, tiny.params)
  with pytest.raises(ValueError, match='hawk_draft'):
    engine.build_decoder(no_drafter, 'hawk', Sampling(), None, helpers.one_device_mesh())


# --- sampled hawk has the target's distribution --------------------------------------------

DIST_GRID, DIST_VOCAB, DIST_LABEL, N_SAMPLES = (2, 3), 4, 1, 32768
SETTINGS = {
    'temperature_1': Sampling(temperature=1.0),
    'cfg_top_k_top_p': Sampling(temperature=1.0, top_k=3, top_p=0.95, cfg_scale=3.0),
}


@pytest.fixture(scope='module')
def small():
  """12x sharpened logits put the mass on a few hundred of the 4096 grids (measurable with
  32k samples); a half-strength drafter correction keeps acceptance and rejection common."""
  return tiny_bundle(DIST_GRID, DIST_VOCAB, 16, sharpen=12.0, embed_scale=1.0, out_scale=0.5)


def sampled_report(bundle, name):
  """helpers.distribution_report of N_SAMPLES hawk samples against the exact distribution
  (joint TV, per-position and pairwise marginals, mean log-probability), and the stats."""
  tokens, stats = run(bundle, 'hawk', SETTINGS[name], np.full(N_SAMPLES, DIST_LABEL),
                      engine.image_keys(0, 0, N_SAMPLES), draft_len=DRAFT_LEN)
  p = helpers.exact_distribution(bundle, SETTINGS[name], DIST_LABEL)
  return helpers.distribution_report(tokens, p, DIST_VOCAB), stats


@pytest.mark.parametrize('name', SETTINGS)
def test_sampled_hawk_has_the_exact_distribution(small, name):
  report, stats = sampled_report(small, name)
  drafted = N_SAMPLES * (DIST_GRID[0] * DIST_GRID[1] - 1)
  accepted = stats['accepted_drafts'].sum() / drafted
  vertical = stats['accepted_vertical'].sum() / drafted
  print(f'{name}: {helpers.format_report(report)}; accepted drafts {accepted:.2f} of tokens '
        f'({vertical:.2f} vertical), {stats["sample_passes"].mean():.2f} passes per sample')
  # Vertical drafts exist on row 1 only and are tried after a horizontal rejection.
  assert 0.2 < accepted < 0.8 and vertical > 0.02
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


def test_vertical_draft_against_p_instead_of_the_residual_fails_a_check(small, monkeypatch):
  def broken(uniform, p, drafts, qs, present):
    """Each candidate tested against p itself: the classic multi-draft mistake."""
    choice, r = jnp.full(drafts.shape[:1], -1), p
    for c in range(drafts.shape[1]):
      test = present[:, c] & (choice < 0)
      one, r_c = exact_rule(uniform[:, c:c + 1], p, drafts[:, c:c + 1], qs[:, c:c + 1],
                            test[:, None])
      choice = jnp.where(one >= 0, c, choice)
      r = jnp.where((test & (one < 0))[:, None], r_c, r)
    return choice, r

  exact_rule = acceptance.accept_multi
  monkeypatch.setattr(acceptance, 'accept_multi', broken)
  # A copy without the decoders kept on `small`: the loop is traced again, with the broken
  # rule (hawk looks acceptance.accept_multi up when it traces).
  report, _ = sampled_report(dataclasses.replace(small, constants={}), 'temperature_1')
  print(f'broken rule: {helpers.format_report(report)}')
  assert not all(ok for _, ok in report.values()), helpers.format_report(report)


def test_accept_multi_single_candidate_is_the_exact_rule():
  rng = np.random.default_rng(0)
  p, q = (jnp.asarray(rng.dirichlet(np.ones(6), 64), jnp.float32) for _ in range(2))
  x, u = jnp.asarray(rng.integers(0, 6, 64)), jnp.asarray(rng.random(64), jnp.float32)
  choice, r = acceptance.accept_multi(u[:, None], p, x[:, None], q[:, None],
                                jnp.ones((64, 1), bool))
  ok, resid = acceptance.accept_exact(u[:, None], p[:, None], q[:, None], x[:, None])
  np.testing.assert_array_equal(choice >= 0, ok[:, 0])
  np.testing.assert_allclose(np.where((choice < 0)[:, None], r, 0),
                             np.where((choice < 0)[:, None], resid[:, 0], 0), atol=1e-6)


# --- the hawk_draft stage ------------------------------------------------------------------

def stop_after(monkeypatch, stop_at):
  """SIGTERM once the batch of step stop_at - 1 is out: the loop stops after that step."""
  next_batch = pipeline.Batches.__next__

  def next_then_stop(self):
    batch = next_batch(self)
    if self.step == stop_at:
      os.kill(os.getpid(), signal.SIGTERM)
    return batch
  monkeypatch.setattr(pipeline.Batches, '__next__', next_then_stop)


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Smoke tokenizer and ar runs, then hawk_draft: stopped after step 4 of 8, rerun."""
  root = tmp_path_factory.mktemp('hawk_runs')
  write_fashion_idx(root / 'idx')
  workdir = str(root / 'work')
  with training_test.no_partitionable_threefry():
    stages.run(training_test.smoke_config(root, 'tokenizer'), workdir)
  stages.run(training_test.smoke_config(root, 'ar'), workdir)
  config = hawk_config.get_config('smoke')
  config.data.idx_dir = str(root / 'idx')
  config.data.data_dir = str(root / 'tfds')
  config.num_steps, config.log_every, config.checkpoint_every = 8, 1, 4
  config.learning_rate = 1e-2
  with pytest.MonkeyPatch.context() as monkeypatch:
    stop_after(monkeypatch, 4)
    with pytest.raises(SystemExit) as stopped:
      stages.run(config, workdir)
  assert stopped.value.code == 143
  stopped_at = checkpoint.StageCheckpoints(os.path.join(workdir, 'hawk_draft')).latest_step()
  stages.run(config, workdir)
  return dict(workdir=workdir, config=config, stopped_at=stopped_at)


def test_hawk_stage_lowers_its_loss_resumes_and_loads(runs):
  stage_dir = os.path.join(runs['workdir'], 'hawk_draft')
  assert runs['stopped_at'] == 4
  metrics = training_test.read_metrics(stage_dir)
  # One line per step across the stop: the rerun took up at step 5.
  assert [m['step'] for m in metrics] == list(range(1, 9))
  losses = [m['loss'] for m in metrics]
  assert np.mean(losses[-2:]) < np.mean(losses[:2]), losses
  results = checkpoint.load_json(os.path.join(stage_dir, 'results.json'))
  assert results['step'] == 8
  for mode in ('horizontal', 'horizontal_chain', 'vertical'):
    assert 0 <= results[mode]['top1_agreement'] <= 1 and 0 < results[mode]['acceptance'] <= 1
  # What sample.py --method=hawk loads.
  bundle = pretrained.load(runs['workdir'], stages=registry.get('hawk').needs)
  drafter, drafter_params = bundle.stage('hawk_draft').module, bundle.stage('hawk_draft').params
  assert drafter.grid == bundle.model.grid and drafter.dim == bundle.model.dim
  assert jax.tree.structure(drafter_params) == jax.tree.structure(
      sharding.strip_boxes(drafter.init(jax.random.key(0), *pretrained.init_args(
          'hawk_draft', drafter)))['params'])
