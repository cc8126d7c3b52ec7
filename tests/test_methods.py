"""sjd, gsd, lantern and zipar as engine methods, on tiny random models.

Properties: greedy sjd is plain AR; sampled sjd (and gsd with empty clusters) has the
target's exact distribution (checked against the distribution enumerated over every grid
of a 2x3, 4-token model), and an injected broken rule fails the same checks; gsd with an
empty cluster is sjd and lantern with delta 0 is speculative decoding, token for token;
zipar takes the passes its schedule implies (AR's with window = W) and row 0 sees only
what raster order allows; every knob's bad value is refused by name.
"""

import re
import types

import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import codebook
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding.methods import jacobi
from ssd_jax.decoding.methods import zipar

GRID = (3, 4)
VOCAB = 16


def tiny_bundle(vocab, grid, seed=0, sharpen=12.0):
  """A random 2-layer model (+ heads, + codebook): peaked next-token distributions that
  depend on the context (large token embeddings)."""
  return helpers.heads_bundle(vocab, grid, seed=seed, sharpen=sharpen, embed_scale=25.0,
                              num_horizontal=2, copy=False, with_codes=True)


@pytest.fixture(scope='module')
def bundle():
  return tiny_bundle(VOCAB, GRID)


@pytest.fixture(scope='module')
def mesh():
  return helpers.one_device_mesh()


def run(bundle, mesh, method, sampling, num_images=8, seed=3, **options):
  return engine.generate(bundle, method, sampling, num_images=num_images,
                         batch_size=num_images, seed=seed, mesh=mesh, progress=False,
                         options=options)


GREEDY = sampling_lib.Sampling(temperature=0.0, cfg_scale=2.0)
SAMPLED = sampling_lib.Sampling(temperature=1.0, cfg_scale=2.0)


@pytest.fixture(scope='module')
def greedy_ar(bundle, mesh):
  return run(bundle, mesh, 'ar', GREEDY)


@pytest.fixture(scope='module')
def sampled_ar(bundle, mesh):
  return run(bundle, mesh, 'ar', SAMPLED)


# --- sjd ---------------------------------------------------------------------------------

@pytest.mark.parametrize('init,window', [('left', 5), ('upper', 16)])
def test_greedy_sjd_equals_ar(bundle, mesh, greedy_ar, init, window):
  sjd = run(bundle, mesh, 'sjd', GREEDY, window=window, init=init)
  helpers.assert_greedy_equal(bundle, sjd.tokens, greedy_ar.tokens, greedy_ar.labels,
                              GREEDY.cfg_scale, f'sjd {init} {window}')
  assert sjd.stats['target_passes'] <= greedy_ar.stats['target_passes']


@pytest.mark.parametrize('init', ['left', 'upper'])
def test_copy_fill_matches_a_left_to_right_fill(init):
  """The vectorised fill (pointer doubling) equals filling the window one position at a
  time, copies of copies included, at ragged prefixes and fresh counts."""
  grid, window_len, b = (5, 4), 13, 6
  model = types.SimpleNamespace(grid=grid, vocab_size=50)
  target = types.SimpleNamespace(model=model)
  rng = np.random.default_rng(3)
  n = rng.integers(1, 20, b)
  num_fresh = np.minimum(rng.integers(0, 6, b), window_len)
  tokens = np.where(np.arange(20)[None] < n[:, None], rng.integers(0, 50, (b, 20)), -1)
  fresh = rng.integers(0, 50, (b, window_len))
  fresh_q = rng.random((b, window_len, 50)).astype(np.float32)
  window, q = jacobi.fill_window(target, init, None, jnp.asarray(tokens), jnp.asarray(n),
                                 jnp.asarray(fresh), jnp.asarray(fresh_q),
                                 jnp.asarray(num_fresh))
  for i in range(b):
    canvas = list(tokens[i][:n[i]])
    for j in range(window_len):
      pos = n[i] + j
      if j < num_fresh[i]:
        canvas.append(fresh[i, j])
        continue
      if init == 'left':
        src = pos - 1 if pos % grid[1] else pos - grid[1]
      else:
        src = pos - grid[1] if pos >= grid[1] else pos - 1
      canvas.append(canvas[src])
    np.testing.assert_array_equal(window[i], canvas[n[i]:], err_msg=f'sample {i}')
    expect_q = np.where(np.arange(window_len)[:, None] < num_fresh[i], fresh_q[i],
                        np.eye(50)[np.asarray(canvas[n[i]:])])
    np.testing.assert_allclose(q[i], expect_q)


DIST_N = 20480
_accept_exact = acceptance.accept_exact
_accept_grouped = acceptance.accept_grouped


@pytest.fixture(scope='module')
def enum_bundle():
  return tiny_bundle(4, (2, 3), seed=1, sharpen=15.0)  # entropy ~4.5 nats


def sampled_report(enum_bundle, mesh, method, sampling, **options):
  label = 1
  p = helpers.exact_distribution(enum_bundle, sampling, label)
  result = engine.generate(enum_bundle, method, sampling, num_images=DIST_N,
                           batch_size=4096, classes=[label], seed=7, mesh=mesh,
                           progress=False, options=options)
  report = helpers.distribution_report(result.tokens.reshape(DIST_N, -1), p, 4)
  print(f'{method} {options}: {helpers.format_report(report)}')
  return report, result


@pytest.mark.parametrize('init,window,cfg', [('random', 2, 1.0), ('upper', 4, 1.5)])
def test_sampled_sjd_has_the_exact_distribution(enum_bundle, mesh, init, window, cfg):
  sampling = sampling_lib.Sampling(temperature=1.0, cfg_scale=cfg)
  report, result = sampled_report(enum_bundle, mesh, 'sjd', sampling, window=window,
                                  init=init)
  assert all(ok for _, ok in report.values()), helpers.format_report(report)
  # Drafts were accepted, so the windows (not only the corrections) were exercised.
  assert result.stats['tokens_per_pass'] > 1.1


def test_sampled_gsd_with_empty_clusters_has_the_exact_distribution(enum_bundle, mesh):
  report, _ = sampled_report(enum_bundle, mesh, 'gsd', SAMPLED, window=4, init='upper',
                             prob_threshold=0.0, dist_threshold=0.0)
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


def resample_from_p(uniform, p, q, draft):
  """Rejected drafts replaced by a draw from p instead of the residual."""
  return _accept_exact(uniform, p, q, draft)[0], p


def grouped_pooling_everything(uniform, p, q, draft, near, rank_window, prob_threshold):
  """GSD's rule ignoring its thresholds: every token within the rank window joins."""
  del near, prob_threshold
  vocab = p.shape[-1]
  everyone = jnp.asarray([[v for v in range(vocab) if v != x] for x in range(vocab)])
  return _accept_grouped(uniform, p, q, draft, everyone, rank_window, 1.0)


@pytest.mark.parametrize('method,rule_name,rule', [
    ('sjd', 'accept_exact', resample_from_p),
    ('gsd', 'accept_grouped', grouped_pooling_everything)])
def test_broken_rule_fails_the_distribution_checks(enum_bundle, mesh, monkeypatch, method,
                                                   rule_name, rule):
  monkeypatch.setattr(acceptance, rule_name, rule)
  options = dict(window=4, init='upper')
  if method == 'gsd':
    options.update(prob_threshold=0.0, dist_threshold=0.0)
  report, _ = sampled_report(helpers.fresh(enum_bundle), mesh, method, SAMPLED, **options)
  assert not all(ok for _, ok in report.values()), helpers.format_report(report)


# --- gsd / lantern reduce to their exact bases -------------------------------------------

def test_gsd_with_empty_clusters_is_sjd(bundle, mesh):
  knobs = dict(window=4, init='left')
  sjd = run(bundle, mesh, 'sjd', SAMPLED, **knobs)
  gsd = run(bundle, mesh, 'gsd', SAMPLED, prob_threshold=0.0, dist_threshold=0.0, **knobs)
  np.testing.assert_array_equal(gsd.tokens, sjd.tokens)
  assert gsd.stats['target_passes'] == sjd.stats['target_passes']


def test_lantern_with_zero_delta_is_speculative(bundle, mesh):
  spec = run(bundle, mesh, 'speculative', SAMPLED, draft_len=3)
  lantern = run(bundle, mesh, 'lantern', SAMPLED, draft_len=3, delta=0.0, k=4)
  np.testing.assert_array_equal(lantern.tokens, spec.tokens)
  assert lantern.stats['target_passes'] == spec.stats['target_passes']


def near_of(codes, dist_threshold):
  bundle = helpers.bundle(None, None, tokenizer=types.SimpleNamespace(
      apply=lambda *a, **k: codes, codes=None), tokenizer_params={})
  return codebook.within(bundle, dist_threshold)


def test_grouped_rule_pools_the_cluster():
  # Codes 0..3 close together, 4, 5 far; ranking by p: 1, 0, 2, 4, 3, 5.
  codes = jnp.array([[1, 0], [1, .1], [1, -.1], [.95, .2], [-1, 0], [0, 1.]])
  codes = codes / jnp.linalg.norm(codes, axis=-1, keepdims=True)
  p = jnp.array([[[.3, .32, .2, .03, .15, 0.]]])
  q = jnp.array([[[.9, 0, 0, 0, .1, 0.]]])
  draft = jnp.array([[0]])
  u = jnp.array([[.5]])
  accept, _ = acceptance.accept_grouped(u, p, q, draft, near_of(codes, .1), 7, .15)
  assert bool(accept[0, 0])  # C = {0, 1, 2}: p(C) / q(C) = .82 / .9 > .5; 3 differs in p
  accept, _ = acceptance.accept_grouped(u, p, q, draft, near_of(codes, 0.), 7, 0.)
  assert not bool(accept[0, 0])  # C = {0}: .3 / .9 < .5, the exact rule
  accept, _ = acceptance.accept_grouped(u, p, q, draft, near_of(codes, .1), 1, .15)
  assert bool(accept[0, 0])  # ranks +-1 of 0 are 1 and 2: the same cluster


def reference_grouped(uniform, p, q, draft, codes, rank_window, prob_threshold,
                      dist_threshold):
  """GSD's rule as published: sort the vocabulary by p, take the ranks around the draft."""
  vocab = p.shape[-1]
  order = jnp.argsort(-p, axis=-1, stable=True)
  rank = jnp.argmax(order == draft[..., None], axis=-1)
  offsets = jnp.arange(-rank_window, rank_window + 1)
  cand_rank = rank[..., None] + offsets
  in_range = (cand_rank >= 0) & (cand_rank < vocab)
  cand = jnp.take_along_axis(order, jnp.clip(cand_rank, 0, vocab - 1), -1)
  p_c, q_c = jnp.take_along_axis(p, cand, -1), jnp.take_along_axis(q, cand, -1)
  dist = jnp.sum((codes[cand] - codes[draft][..., None, :]) ** 2, -1)
  p_x = jnp.take_along_axis(p, draft[..., None], -1)
  member = (in_range & (jnp.abs(p_c - p_x) < prob_threshold) & (dist < dist_threshold)) | (
      offsets == 0)
  return uniform * jnp.sum(jnp.where(member, q_c, 0.), -1) < jnp.sum(
      jnp.where(member, p_c, 0.), -1)


@pytest.mark.parametrize('rank_window,prob_threshold,dist_threshold', [
    (7, .15, .3), (2, .05, .6), (30, 1., 4.), (3, .1, 0.)])
def test_grouped_rule_without_sorting_equals_the_published_rule(rank_window, prob_threshold,
                                                                dist_threshold):
  rng = np.random.default_rng(0)
  vocab, shape = 32, (64, 5)
  codes = rng.normal(size=(vocab, 3))
  codes = jnp.asarray(codes / np.linalg.norm(codes, axis=-1, keepdims=True), jnp.float32)
  p = rng.dirichlet(np.full(vocab, .3), shape)
  p[:8] = np.round(p[:8], 2)  # ties in p: the ranking breaks them by token id
  p = jnp.asarray(p / p.sum(-1, keepdims=True), jnp.float32)
  q = jnp.asarray(rng.dirichlet(np.full(vocab, .3), shape), jnp.float32)
  draft = jnp.asarray(rng.integers(0, vocab, shape))
  u = jnp.asarray(rng.random(shape), jnp.float32)
  want = reference_grouped(u, p, q, draft, codes, rank_window, prob_threshold, dist_threshold)
  got, _ = acceptance.accept_grouped(u, p, q, draft, near_of(codes, dist_threshold),
                                     rank_window, prob_threshold)
  np.testing.assert_array_equal(got, want)
  assert 0 < int(got.sum()) < got.size


def test_relaxed_rule_pools_neighbours_up_to_delta():
  p = jnp.array([[[.1, .05, .2, .3, .35]]])
  q = jnp.array([[[.6, .1, .1, .1, .1]]])
  neighbours = jnp.array([[1, 2, 3, 4]] * 5)
  draft, u = jnp.array([[0]]), jnp.array([[.45]])
  cases = {0.0: False, 0.1: False, 0.25: True, 0.54: True}  # pools .05, .05, .25, .25
  for delta, expected in cases.items():
    accept, _ = acceptance.accept_relaxed(u, p, q, draft, neighbours, delta)
    assert bool(accept[0, 0]) == expected, delta


# --- zipar -------------------------------------------------------------------------------

def test_zipar_with_full_window_is_ar(bundle, mesh, sampled_ar):
  ar = sampled_ar
  zip_full = run(bundle, mesh, 'zipar', SAMPLED, window=GRID[1])
  assert zip_full.stats['target_passes'] == ar.stats['target_passes'] == GRID[0] * GRID[1]
  np.testing.assert_array_equal(zip_full.tokens, ar.tokens)


@pytest.mark.parametrize('window', [1, 2])
def test_zipar_takes_the_passes_of_its_schedule(bundle, mesh, sampled_ar, window):
  ar = sampled_ar
  result = run(bundle, mesh, 'zipar', SAMPLED, window=window)
  # (r, c) is sampled in pass 1 + r * window + c: the last one in (H - 1) * window + W.
  passes = (GRID[0] - 1) * window + GRID[1]
  assert zipar.num_passes(GRID, window) == passes
  assert result.stats['target_passes'] == passes
  assert result.stats['tokens_per_pass'] == pytest.approx(GRID[0] * GRID[1] / passes)
  assert (result.tokens >= 0).all()
  # Row 0 sees only the prefix and itself, exactly as in AR (same keys per token): a mask
  # that leaked a lower row's tokens into it would change it.
  np.testing.assert_array_equal(result.tokens[:, 0], ar.tokens[:, 0])


# --- flags -------------------------------------------------------------------------------

@pytest.mark.parametrize('method,field,value', [
    ('sjd', 'window', 0), ('sjd', 'init', 'diagonal'), ('gsd', 'rank_window', -1),
    ('gsd', 'prob_threshold', -0.1), ('gsd', 'prob_threshold', 1.5),
    ('gsd', 'dist_threshold', -1.0), ('gsd', 'dist_threshold', 5.0), ('lantern', 'k', 0),
    ('lantern', 'delta', -0.1), ('lantern', 'delta', 2.0), ('zipar', 'window', -1)])
def test_bad_option_is_refused_by_its_flag(method, field, value):
  spec = registry.get(method)
  with pytest.raises(ValueError, match=re.escape(f'--{method}_{field}={value!r} must be')):
    spec.validate(spec.make_options(**{field: value}))


@pytest.mark.parametrize('method,field,value,message', [
    ('lantern', 'k', VOCAB, f'--lantern_k={VOCAB} must be < {VOCAB}'),
    ('zipar', 'window', GRID[1] + 1, f'--zipar_window={GRID[1] + 1} must be <= {GRID[1]}')])
def test_option_too_large_for_the_model_is_refused(bundle, mesh, method, field, value,
                                                   message):
  with pytest.raises(ValueError, match=re.escape(message)):
    engine.build_decoder(bundle, method, sampling_lib.Sampling(), {field: value}, mesh)


def test_methods_declare_what_they_are():
  assert registry.get('sjd').lossless and not registry.get('gsd').lossless
  assert 'heads' in registry.get('lantern').needs and registry.get('zipar').needs == ()
  assert 'tokenizer' in registry.get('gsd').needs
