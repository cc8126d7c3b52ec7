"""sjd, gsd, lantern and zipar as engine methods, on tiny random models.

Properties: greedy sjd is plain AR; sampled sjd has the target's exact distribution
(checked against the distribution enumerated over every grid of a 2x3, 4-token model);
gsd with an empty cluster is sjd and lantern with delta 0 is speculative decoding, token
for token; zipar takes the passes its schedule implies (AR's with window = W) and row 0
sees only what raster order allows; every knob's bad value is refused by name.
"""

import dataclasses
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import pretrained
from ssd_jax import sample_job
from ssd_jax import sharding
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding import zipar
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import transformer
from ssd_jax.models import vq

GRID = (3, 4)
VOCAB = 16


def tiny_bundle(vocab, grid, seed=0, sharpen=12.0):
  """A random 2-layer model (+ heads, + tokenizer codebook). `sharpen` scales the output
  layer (peaked next-token distributions) and larger token embeddings make them depend
  on the context."""
  keys = jax.random.split(jax.random.key(seed), 3)
  model = transformer.Transformer(vocab_size=vocab, num_classes=3, grid=grid, num_layers=2,
                                  dim=32, num_heads=2, mlp_dim=64)
  n = grid[0] * grid[1]
  params = sharding.strip_boxes(model.init(keys[0], jnp.zeros((1, n), jnp.int32),
                                           jnp.zeros((1,), jnp.int32))['params'])
  params['lm_head']['kernel'] = params['lm_head']['kernel'] * sharpen
  params['token_embed']['embedding'] = params['token_embed']['embedding'] * 25.0
  heads = heads_lib.NeighbourHeads(num_horizontal=2, num_vertical=1, dim=32, mlp_dim=32)
  heads_params = sharding.strip_boxes(heads.init(keys[1], jnp.zeros((1, 32)),
                                                 jnp.zeros((1, 32)))['params'])
  tok = vq.VQTokenizer(codebook_size=vocab, code_dim=4, channels=8, num_res_blocks=1)
  tok_params = sharding.strip_boxes(tok.init(keys[2], jnp.zeros((1, 4, 4, 1)))['params'])
  return pretrained.Bundle('tiny', tok, tok_params, model, params, heads, heads_params)


@pytest.fixture(scope='module')
def bundle():
  return tiny_bundle(VOCAB, GRID)


@pytest.fixture(scope='module')
def mesh():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def run(bundle, mesh, method, sampling, num_images=8, seed=3, **options):
  return engine.generate(bundle, method, sampling, num_images=num_images,
                         batch_size=num_images, seed=seed, mesh=mesh, progress=False,
                         options=engine.Options(**options))


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
  sjd = run(bundle, mesh, 'sjd', GREEDY, sjd_window=window, sjd_init=init)
  np.testing.assert_array_equal(sjd.tokens, greedy_ar.tokens)
  assert sjd.stats['target_passes'] <= greedy_ar.stats['target_passes']


def exact_distribution(bundle, sampling, label):
  """P(grid) [V ** N] of every grid (itertools.product order) by teacher forcing."""
  model, vocab = bundle.model, bundle.model.vocab_size
  grids = np.array(list(itertools.product(range(vocab), repeat=model.num_tokens)), np.int32)
  logits = [model.apply({'params': bundle.params}, grids, np.full(len(grids), c, np.int32))[0]
            for c in ([label, model.null_class] if sampling.uses_cfg else [label])]
  probs = target_lib.Target(model, sampling).probs(jnp.stack(logits))   # [M, N, V]
  per_token = jnp.take_along_axis(probs, grids[..., None], -1)[..., 0]
  return np.prod(np.asarray(per_token, np.float64), -1)


def tv_bound(p, n, alpha=1e-3):
  """A bound TV(empirical, p) stays under with probability >= 1 - alpha for n draws:
  E|p_hat_i - p_i| <= sd = sqrt(p_i (1 - p_i) / n) (Jensen), so E[TV] <= the first term;
  TV moves by at most 1/n per draw, so McDiarmid adds sqrt(log(1 / alpha) / (2 n)).
  Here the bound is ~0.064; exact sjd measured ~0.04, and a broken sjd that resamples
  rejections from p instead of the residual 0.14-0.20."""
  return 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + math.sqrt(math.log(1 / alpha) / (2 * n))


@pytest.mark.parametrize('init,window,cfg', [('random', 2, 1.0), ('upper', 4, 1.5)])
def test_sampled_sjd_has_the_exact_distribution(mesh, init, window, cfg):
  enum_bundle = tiny_bundle(4, (2, 3), seed=1, sharpen=15.0)  # entropy ~4.5 nats
  sampling = sampling_lib.Sampling(temperature=1.0, cfg_scale=cfg)
  label, n = 1, 20480
  p = exact_distribution(enum_bundle, sampling, label)
  assert abs(p.sum() - 1) < 1e-4
  result = engine.generate(enum_bundle, 'sjd', sampling, num_images=n, batch_size=4096,
                           classes=[label], seed=7, mesh=mesh, progress=False,
                           options=engine.Options(sjd_window=window, sjd_init=init))
  flat = result.tokens.reshape(n, -1)
  index = flat @ (4 ** np.arange(flat.shape[1] - 1, -1, -1))
  empirical = np.bincount(index, minlength=p.size) / n
  tv, bound = 0.5 * np.abs(empirical - p).sum(), tv_bound(p, n)
  assert tv < bound, f'TV {tv:.4f} >= {bound:.4f}'
  # Drafts were accepted, so the windows (not only the corrections) were exercised.
  assert result.stats['tokens_per_pass'] > 1.1


# --- gsd / lantern reduce to their exact bases -------------------------------------------

def test_gsd_with_empty_clusters_is_sjd(bundle, mesh):
  knobs = dict(sjd_window=4, sjd_init='left')
  sjd = run(bundle, mesh, 'sjd', SAMPLED, **knobs)
  gsd = run(bundle, mesh, 'gsd', SAMPLED, gsd_prob_threshold=0.0, gsd_dist_threshold=0.0,
            **knobs)
  np.testing.assert_array_equal(gsd.tokens, sjd.tokens)
  assert gsd.stats['target_passes'] == sjd.stats['target_passes']


def test_lantern_with_zero_delta_is_speculative(bundle, mesh):
  spec = run(bundle, mesh, 'speculative', SAMPLED, draft_len=3)
  lantern = run(bundle, mesh, 'lantern', SAMPLED, draft_len=3, lantern_delta=0.0,
                lantern_k=4)
  np.testing.assert_array_equal(lantern.tokens, spec.tokens)
  assert lantern.stats['target_passes'] == spec.stats['target_passes']


def test_grouped_rule_pools_the_cluster():
  # Codes 0..3 close together, 4, 5 far; ranking by p: 1, 0, 2, 4, 3, 5.
  codes = jnp.array([[1, 0], [1, .1], [1, -.1], [.95, .2], [-1, 0], [0, 1.]])
  codes = codes / jnp.linalg.norm(codes, axis=-1, keepdims=True)
  p = jnp.array([[[.3, .32, .2, .03, .15, 0.]]])
  q = jnp.array([[[.9, 0, 0, 0, .1, 0.]]])
  draft = jnp.array([[0]])
  u = jnp.array([[.5]])
  accept, _ = acceptance.accept_grouped(u, p, q, draft, codes, 7, .15, .1)
  assert bool(accept[0, 0])  # C = {0, 1, 2}: p(C) / q(C) = .82 / .9 > .5; 3 differs in p
  accept, _ = acceptance.accept_grouped(u, p, q, draft, codes, 7, 0., 0.)
  assert not bool(accept[0, 0])  # C = {0}: .3 / .9 < .5, the exact rule
  accept, _ = acceptance.accept_grouped(u, p, q, draft, codes, 1, .15, .1)
  assert bool(accept[0, 0])  # ranks +-1 of 0 are 1 and 2: the same cluster


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
  zip_full = run(bundle, mesh, 'zipar', SAMPLED, zipar_window=GRID[1])
  assert zip_full.stats['target_passes'] == ar.stats['target_passes'] == GRID[0] * GRID[1]
  np.testing.assert_array_equal(zip_full.tokens, ar.tokens)


@pytest.mark.parametrize('window', [1, 2])
def test_zipar_takes_the_passes_of_its_schedule(bundle, mesh, sampled_ar, window):
  ar = sampled_ar
  result = run(bundle, mesh, 'zipar', SAMPLED, zipar_window=window)
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

@pytest.mark.parametrize('field,value', [
    ('sjd_window', 0), ('sjd_init', 'diagonal'), ('gsd_rank_window', -1),
    ('gsd_prob_threshold', -0.1), ('gsd_prob_threshold', 1.5),
    ('gsd_dist_threshold', -1.0), ('gsd_dist_threshold', 5.0), ('lantern_k', 0),
    ('lantern_delta', -0.1), ('lantern_delta', 2.0), ('zipar_window', -1)])
def test_bad_option_is_refused_by_name(field, value):
  shown = repr(value) if isinstance(value, str) else value
  with pytest.raises(ValueError, match=re.escape(f'--{field}={shown} must be')):
    engine.Options(**{field: value}).validate()


@pytest.mark.parametrize('method,field,value,message', [
    ('lantern', 'lantern_k', VOCAB, f'--lantern_k={VOCAB} must be < {VOCAB}'),
    ('zipar', 'zipar_window', GRID[1] + 1, f'--zipar_window={GRID[1] + 1} must be <= '
     f'{GRID[1]}')])
def test_option_too_large_for_the_model_is_refused(bundle, mesh, method, field, value,
                                                   message):
  with pytest.raises(ValueError, match=message):
    engine.build_decoder(bundle, method, sampling_lib.Sampling(),
                         engine.Options(**{field: value}), mesh)


def test_sample_args_carry_every_new_knob():
  args = {f.name for f in dataclasses.fields(sample_job.SampleArgs)}
  for name in ('sjd_window', 'sjd_init', 'gsd_rank_window', 'gsd_prob_threshold',
               'gsd_dist_threshold', 'lantern_k', 'lantern_delta', 'zipar_window'):
    assert name in args and name in engine.Options.__dataclass_fields__
  for name in ('sjd', 'gsd', 'lantern', 'zipar'):
    assert name in engine.METHODS
  assert engine.METHODS['sjd'].lossless and not engine.METHODS['gsd'].lossless
  assert engine.METHODS['lantern'].needs_heads and not engine.METHODS['zipar'].needs_heads
