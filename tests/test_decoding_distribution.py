"""Sampled `speculative` (and `ar`, and `lantern` with delta 0) draw from exactly the
target's distribution.

A 2x3 grid with a 4-token vocabulary has 4^6 = 4096 grids. One teacher-forced pass over
all of them, with the logits processed as decoding processes them (Target.probs: CFG,
temperature, top-k, top-p), gives each grid's exact probability. N_SAMPLES decoded grids
are compared with it by helpers.distribution_report: the joint total variation against the
noise of a perfect sampler, chi-square tests of every position's and every pair's
marginal, and the mean log-probability of the samples. The same checks must fail when the
acceptance rule is broken (an injected rule), which shows they have the power to catch an
inexact rule.
"""

import jax.numpy as jnp
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib

Sampling = sampling_lib.Sampling

GRID = (2, 3)
VOCAB = 4
LABEL = 1
N_SAMPLES = 32768
SETTINGS = {
    'temperature_1': Sampling(temperature=1.0),
    'cfg_top_k_top_p': Sampling(temperature=1.0, top_k=3, top_p=0.95, cfg_scale=3.0),
}
# Three drafts per pass on a row of three: horizontal drafts, vertical drafts for the next
# row, and positions no head reaches all occur.
OPTIONS = {'draft_len': 3, 'horizontal_first': 1}
_accept_exact = acceptance.accept_exact
_accept_relaxed = acceptance.accept_relaxed


def broken_resample_from_p(uniform, p, q, draft):
  """Rejected drafts are replaced by a draw from p instead of the residual."""
  return _accept_exact(uniform, p, q, draft)[0], p


def broken_accept_if_possible(uniform, p, q, draft):
  """Any draft the target could have produced (p(x) > 0) stands."""
  del uniform
  return jnp.take_along_axis(p, draft[..., None], -1)[..., 0] > 0, acceptance.residual(p, q)


def broken_relaxed(uniform, p, q, draft, neighbours, delta):
  """LANTERN's rule pooling the neighbours' mass whatever delta says."""
  del delta
  return _accept_relaxed(uniform, p, q, draft, neighbours, delta=1.0)


@pytest.fixture(scope='module')
def bundle():
  """Random backbone with 12x peaked logits (the mass on a few hundred of the 4096 grids,
  which 32k samples measure well, every token still random); random heads, so a good share
  of drafts fails; a random codebook for lantern."""
  return helpers.heads_bundle(VOCAB, GRID, sharpen=12.0, num_horizontal=2, copy=False,
                              num_layers=1, dim=16, mlp_dim=32, with_codes=True)


@pytest.fixture(scope='module')
def chain_bundle():
  """The same backbone with chain heads (each draft conditions on the one before it)."""
  return helpers.heads_bundle(VOCAB, GRID, sharpen=12.0, num_horizontal=2, copy=False,
                              num_layers=1, dim=16, mlp_dim=32, with_codes=True, chain=True)


@pytest.fixture(scope='module')
def exact(bundle):
  """setting name -> exact probabilities [4096] of every grid for class LABEL."""
  return {name: helpers.exact_distribution(bundle, s, LABEL) for name, s in SETTINGS.items()}


def sample(bundle, method, name, options=None):
  labels = np.full((N_SAMPLES,), LABEL, np.int32)
  return helpers.decode(bundle, method, SETTINGS[name], labels,
                        engine.image_keys(0, 0, N_SAMPLES), options)


def report_for(bundle, exact, method, name, options=None):
  tokens, stats = sample(bundle, method, name, options)
  report = helpers.distribution_report(tokens, exact[name], VOCAB)
  print(f'{method} {name}: {helpers.format_report(report)}')
  return report, stats


@pytest.mark.parametrize('name', SETTINGS)
def test_speculative_samples_the_exact_distribution(bundle, exact, name):
  report, stats = report_for(bundle, exact, 'speculative', name, OPTIONS)
  # Share of tokens 1..5 that were accepted drafts (the rest: residual or p draws).
  accepted = stats['accepted_drafts'].sum() / (N_SAMPLES * (GRID[0] * GRID[1] - 1))
  print(f'accepted drafts {accepted:.2f} of tokens, {stats["sample_passes"].mean():.2f} '
        'passes per sample')
  assert 0.2 < accepted < 0.8, 'both acceptance and rejection must be common to test both'
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


def test_speculative_with_chain_heads_samples_the_exact_distribution(chain_bundle, exact):
  report, stats = report_for(chain_bundle, exact, 'speculative', 'cfg_top_k_top_p', OPTIONS)
  assert stats['accepted_drafts'].sum() > 0.2 * N_SAMPLES
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


@pytest.mark.parametrize('name', SETTINGS)
def test_ar_samples_the_exact_distribution(bundle, exact, name):
  report, _ = report_for(bundle, exact, 'ar', name)
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


def test_lantern_with_zero_delta_samples_the_exact_distribution(bundle, exact):
  report, stats = report_for(bundle, exact, 'lantern', 'temperature_1',
                             dict(OPTIONS, delta=0.0, k=2))
  assert stats['accepted_drafts'].sum() > 0
  assert all(ok for _, ok in report.values()), helpers.format_report(report)


# Negative controls: an injected broken rule must fail the same checks. (The decoders are
# built afresh: the rules are looked up when a method's loop is built, and build_decoder
# keeps decoders per bundle, so each control uses a copy of the bundle.)

@pytest.mark.parametrize('name,rule', [
    ('temperature_1', broken_resample_from_p), ('cfg_top_k_top_p', broken_accept_if_possible)])
def test_broken_acceptance_rule_fails_the_checks(bundle, exact, monkeypatch, name, rule):
  monkeypatch.setattr(acceptance, 'accept_exact', rule)
  report, _ = report_for(helpers.fresh(bundle), exact, 'speculative', name, OPTIONS)
  assert not all(ok for _, ok in report.values()), helpers.format_report(report)


def test_lantern_broken_relaxed_rule_fails_the_checks(bundle, exact, monkeypatch):
  monkeypatch.setattr(acceptance, 'accept_relaxed', broken_relaxed)
  report, _ = report_for(helpers.fresh(bundle), exact, 'lantern', 'temperature_1',
                         dict(OPTIONS, delta=0.0, k=2))
  assert not all(ok for _, ok in report.values()), helpers.format_report(report)
