"""Properties of the decoding engine (issue 5) on tiny random models.

Greedy `speculative` reproduces greedy `ar` token for token (also on the released checkpoint
when it exists), samples in one batch progress independently, `ssd` spends exactly the
passes its row schedule implies, bad input is refused with a ValueError before anything
compiles, and the acceptance rules agree where they should. That sampled `speculative`
has the target's exact distribution is tested in test_decoding_distribution.py.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from ssd_jax import pretrained
from ssd_jax import sample_job
from ssd_jax import sharding
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib

Sampling = sampling_lib.Sampling

GRID = (4, 5)  # W = 5 leaves room for three horizontal heads and row-crossing drafts
VOCAB = 16
NUM_CLASSES = 3
DIM = 32
LABELS = np.array([0, 1, 2, 1, 0, 2, 2, 1], np.int32)  # batch 8, mixed classes
RELEASE_HEADS = os.path.join(pretrained.DEFAULT_RELEASE, 'heads', 'model.json')


@pytest.fixture(scope='module')
def tiny():
  """A random 2-layer backbone with peaked logits and heads that copy their source state
  (see helpers.heads_bundle), so drafts are both accepted and rejected."""
  return helpers.heads_bundle(VOCAB, GRID)


@pytest.fixture(scope='module')
def decode(tiny):
  """decode(method, sampling, labels, keys, **options) -> (tokens [B, N], stats) as numpy,
  through engine.build_decoder (the methods as sample.py builds them; compiled once per
  setting)."""
  def run(method, sampling, labels=LABELS, keys=None, **options):
    return helpers.decode(tiny, method, sampling, labels, keys, options)
  return run


# --- greedy speculative == greedy AR ------------------------------------------------------

@pytest.mark.parametrize('cfg_scale,draft_len,horizontal_first', [
    (1.0, 1, 1), (1.0, 6, 3), (3.0, 4, 2)])
def test_greedy_speculative_equals_ar(tiny, decode, cfg_scale, draft_len, horizontal_first):
  sampling = Sampling(temperature=0.0, cfg_scale=cfg_scale)
  want, _ = decode('ar', sampling)
  got, stats = decode('speculative', sampling, draft_len=draft_len,
                      horizontal_first=horizontal_first)
  helpers.assert_greedy_equal(tiny, got, want, LABELS, cfg_scale, 'speculative')
  # Equality is only informative if drafts were accepted (and others rejected).
  assert 0 < stats['accepted_drafts'].sum() < len(LABELS) * (GRID[0] * GRID[1] - 1)


def check_generate_lossless(bundle, cfg_scale, num_images, batch_size, mesh,
                            method='speculative'):
  """engine.generate: greedy `method` == greedy AR over padded batches, mixed classes."""
  sampling = Sampling(temperature=0.0, cfg_scale=cfg_scale)
  common = dict(num_images=num_images, batch_size=batch_size, seed=0, mesh=mesh,
                progress=False)
  base = engine.generate(bundle, 'ar', sampling, **common)
  spec = engine.generate(bundle, method, sampling, **common)
  h, w = bundle.model.grid
  assert spec.tokens.shape == base.tokens.shape == (num_images, h, w)
  assert len(set(base.labels.tolist())) > 1
  np.testing.assert_array_equal(spec.labels, base.labels)
  helpers.assert_greedy_equal(bundle, spec.tokens, base.tokens, base.labels, cfg_scale,
                              f'{method}, cfg {cfg_scale}')
  assert base.stats['target_passes'] == base.stats['num_batches'] * h * w
  assert spec.stats['target_passes'] <= base.stats['target_passes']
  return base, spec


def test_generate_greedy_speculative_equals_ar(tiny):
  # The batch split over all 8 test devices; 10 images in batches of 8: the last batch is
  # padded and its padding dropped.
  check_generate_lossless(tiny, cfg_scale=3.0, num_images=10, batch_size=8,
                          mesh=sharding.make_mesh(-1, 1))


@pytest.fixture(scope='module')
def release():
  if not os.path.exists(RELEASE_HEADS):
    pytest.skip(f'the released checkpoint is not trained yet ({RELEASE_HEADS} is missing); '
                'train checkpoints/fmnist with configs/tokenizer.py, ar.py and heads.py')
  return pretrained.load(stages=('heads', 'hawk_draft'))


@pytest.mark.parametrize('cfg_scale', [1.0, 3.0])
def test_release_greedy_speculative_equals_ar(release, cfg_scale):
  base, spec = check_generate_lossless(release, cfg_scale, num_images=8, batch_size=8,
                                       mesh=helpers.one_device_mesh())
  # Trained heads must save passes, not merely stay exact.
  assert spec.stats['target_passes'] < base.stats['target_passes']


def test_release_greedy_hawk_equals_ar(release):
  base, hawk = check_generate_lossless(release, 2.0, num_images=8, batch_size=8,
                                       mesh=helpers.one_device_mesh(), method='hawk')
  assert hawk.stats['target_passes'] < base.stats['target_passes']


# --- per-sample progress ------------------------------------------------------------------

def test_samples_progress_independently(decode):
  n_tok = GRID[0] * GRID[1]
  keys = engine.image_keys(1, 0, len(LABELS))
  tokens, stats = decode('speculative', Sampling(), keys=keys)
  passes = stats['sample_passes']
  assert len(set(passes.tolist())) > 1, passes
  assert stats['target_passes'] == passes.max()
  assert ((tokens >= 0) & (tokens < VOCAB)).all()
  # Every pass commits the accepted drafts plus one token (the last may fall off the grid):
  # prefill's token 0 + accepted + (passes - 1) covers the grid, at most one over.
  covered = 1 + stats['accepted_drafts'] + passes - 1
  assert ((covered == n_tok) | (covered == n_tok + 1)).all(), covered
  # A sample's tokens and pass count depend on its own class and key only: reversing the
  # batch reverses the outputs, whatever the neighbours' progress.
  rev = np.arange(len(LABELS))[::-1]
  tokens_rev, stats_rev = decode('speculative', Sampling(), labels=LABELS[rev], keys=keys[rev])
  np.testing.assert_array_equal(tokens_rev, tokens[rev])
  np.testing.assert_array_equal(stats_rev['sample_passes'], passes[rev])


# --- ssd row schedule ---------------------------------------------------------------------

def check_ssd_passes(stats, rounds):
  h, w = GRID
  row0 = stats['row0_passes']
  assert ((row0 >= 1) & (row0 <= w)).all(), row0
  np.testing.assert_array_equal(stats['sample_passes'], 1 + row0 + (h - 1) * (1 + rounds))
  assert stats['target_passes'] == stats['sample_passes'].max()


# The pass count follows from the schedule whatever is sampled; greedy loops compile
# faster, one sampled setting exercises the exact verify rounds.
@pytest.mark.parametrize('rounds,temperature', [(0, 0.0), (1, 1.0), (2, 0.0)])
def test_ssd_passes_follow_schedule(decode, rounds, temperature):
  tokens, stats = decode('ssd', Sampling(temperature=temperature), draft_len=3,
                         horizontal_first=1, rounds=rounds)
  assert ((tokens >= 0) & (tokens < VOCAB)).all()
  check_ssd_passes(stats, rounds)


def test_greedy_ssd_with_w_minus_1_rounds_equals_ar(tiny, decode):
  # Round j fixes position j of the row (Jacobi), so W - 1 rounds reach AR's row.
  sampling = Sampling(temperature=0.0, cfg_scale=3.0)
  rounds = GRID[1] - 1
  tokens, stats = decode('ssd', sampling, draft_len=4, horizontal_first=2, rounds=rounds)
  helpers.assert_greedy_equal(tiny, tokens, decode('ar', sampling)[0], LABELS, 3.0, 'ssd')
  check_ssd_passes(stats, rounds)


# --- bad input ----------------------------------------------------------------------------

@pytest.fixture
def no_compile(monkeypatch):
  """Any jitted function, once lowered or called, fails: errors must come before that."""

  class NotCompiled:

    def __init__(self, *args, **kwargs):
      del args, kwargs

    def lower(self, *args, **kwargs):
      raise AssertionError('the decoding loop was compiled before the bad input was refused')

    __call__ = lower

  monkeypatch.setattr(jax, 'jit', NotCompiled)


# (generate keyword arguments, what the message must say). The default mesh holds all 8
# test devices on 'data'.
BAD_GENERATE = [
    (dict(classes=[NUM_CLASSES]), f'class {NUM_CLASSES} is out of range'),
    (dict(classes=[0, -1]), 'class -1 is out of range'),
    (dict(batch_size=12), 'batch_size=12 is not divisible by the 8 data devices'),
    (dict(sampling=Sampling(temperature=-0.5)), '--temperature=-0.5 must be >= 0'),
    (dict(sampling=Sampling(top_k=VOCAB + 1)), f'--top_k={VOCAB + 1} must be in [0, {VOCAB}]'),
    (dict(sampling=Sampling(top_p=0.0)), '--top_p=0.0 must be in (0, 1]'),
    (dict(sampling=Sampling(top_p=1.5)), '--top_p=1.5 must be in (0, 1]'),
    (dict(method='no_such_method'), "unknown method 'no_such_method'"),
    (dict(options={'rounds': -1}), '--ssd_rounds=-1 must be >= 0'),
    (dict(sampling=Sampling(cfg_scale=-1.0)), '--cfg_scale=-1.0 must be >= 0'),
    (dict(options={'draft_len': 0}), '--ssd_draft_len=0 must be >= 1'),
    (dict(options={'horizontal_first': -1}), '--ssd_horizontal_first=-1 must be >= 0'),
    (dict(options={'window': 3}), "method 'ssd' has no option 'window'"),
    (dict(num_images=0), '--num_images=0 must be >= 1'),
]


@pytest.mark.parametrize('kwargs,message', BAD_GENERATE)
def test_generate_refuses_bad_input(tiny, no_compile, kwargs, message):
  args = dict(method='ssd', sampling=Sampling(), num_images=16, batch_size=16)
  args.update(kwargs)
  with pytest.raises(ValueError, match=re.escape(message)):
    engine.generate(tiny, progress=False, **args)


def test_generate_refuses_head_methods_without_heads(tiny, no_compile):
  headless = helpers.bundle(tiny.model, tiny.params)
  with pytest.raises(ValueError, match="method 'speculative' needs the heads/ stage"):
    engine.generate(headless, 'speculative', Sampling(), num_images=8, batch_size=8,
                    progress=False)


BAD_SAMPLE_ARGS = [
    (dict(method='no_such_method'), "unknown method 'no_such_method'"),
    (dict(classes=[NUM_CLASSES]), f'class {NUM_CLASSES} is out of range'),
    (dict(batch_size=12), 'batch_size=12 is not divisible by the 8 data devices'),
    (dict(temperature=-1.0), '--temperature=-1.0 must be >= 0'),
    (dict(top_k=VOCAB + 1), f'--top_k={VOCAB + 1} must be in [0, {VOCAB}]'),
    (dict(top_p=0.0), '--top_p=0.0 must be in (0, 1]'),
    (dict(options={'rounds': -1}), '--ssd_rounds=-1 must be >= 0'),
    (dict(num_images=0), '--num_images=0 must be >= 1'),
    (dict(out='/proc/ssd_jax_no_such_dir/x.png'), '--out=/proc/ssd_jax_no_such_dir/x.png '
     'cannot be written'),
]


@pytest.mark.parametrize('kwargs,message', BAD_SAMPLE_ARGS)
def test_sample_job_refuses_bad_input(tiny, no_compile, monkeypatch, tmp_path, kwargs, message):
  # The checkpoint is the tiny bundle; a bad method must be refused before even loading it.
  loads = []
  monkeypatch.setattr(pretrained, 'load', lambda *a, **k: loads.append(a) or tiny)
  args = sample_job.SampleArgs(num_images=16, batch_size=16, out=None,
                               report=str(tmp_path / 'report.json'), progress=False)
  for key, value in kwargs.items():
    setattr(args, key, value)
  with pytest.raises(ValueError, match=re.escape(message)):
    sample_job.run(args)
  assert not os.path.exists(args.report)
  if set(kwargs) & {'method', 'options', 'num_images', 'batch_size', 'out', 'temperature',
                    'top_p'}:
    assert not loads  # refused before the checkpoint loads


# --- acceptance rules ---------------------------------------------------------------------

def test_accept_greedy_agrees_with_exact_on_one_hot():
  rng = np.random.default_rng(0)
  shape, vocab = (64, 5), 7
  best = rng.integers(0, vocab, shape)
  draft = np.where(rng.random(shape) < 0.5, best, rng.integers(0, vocab, shape))
  # Greedy target and draft distributions are one-hot.
  p = np.eye(vocab, dtype=np.float32)[best]
  q = np.eye(vocab, dtype=np.float32)[draft]
  ok_exact, resample_exact = acceptance.accept_exact(rng.random(shape), p, q, draft)
  ok_greedy, resample_greedy = acceptance.accept_greedy(p, draft)
  assert 0 < int(ok_greedy.sum()) < ok_greedy.size
  np.testing.assert_array_equal(ok_exact, ok_greedy)
  np.testing.assert_array_equal(resample_exact, resample_greedy)


def test_residual_is_a_distribution_that_completes_the_accepted_mass():
  rng = np.random.default_rng(1)
  vocab = 6
  p = rng.dirichlet(np.ones(vocab), 32).astype(np.float32)
  q = rng.dirichlet(np.ones(vocab), 32).astype(np.float32)
  q[0] = p[0]                            # p == q: the residual is empty
  p[1], q[1] = np.eye(vocab)[0], np.eye(vocab)[1]  # disjoint supports
  r = np.asarray(acceptance.residual(p, q))
  assert (r >= 0).all()
  np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-6)
  assert (np.where(p <= q, r, 0.0)[1:] == 0).all()  # no mass where q already covers p
  np.testing.assert_allclose(r[0], p[0])             # the empty case falls back to p
  # One speculative step is exact: accepted mass min(p, q) plus the rejected mass
  # 1 - sum(min(p, q)) spread as the residual gives back p.
  accepted = np.minimum(p, q)
  np.testing.assert_allclose(accepted + (1 - accepted.sum(-1, keepdims=True)) * r, p,
                             atol=1e-6)


def test_leading_accepted_stops_at_the_first_rejection():
  accept = jnp.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], bool)
  np.testing.assert_array_equal(acceptance.leading_accepted(accept), [2, 0, 4])
