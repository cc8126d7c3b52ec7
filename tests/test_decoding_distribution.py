"""Sampled `speculative` (and `ar`) draw from exactly the target's distribution.

A 2x3 grid with a 4-token vocabulary has 4^6 = 4096 sequences. One teacher-forced pass over
all of them, with the logits processed as decoding processes them (Target.probs: CFG,
temperature, top-k, top-p), gives each sequence's exact probability. N_SAMPLES decoded
sequences are then compared with it in total variation (TV), against a bound derived from
the sampling noise of a perfect sampler. The same check must fail when the acceptance rule
is broken, which shows it has the power to catch an inexact rule.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import transformer

Sampling = sampling_lib.Sampling

GRID = (2, 3)
VOCAB = 4
DIM = 16
LABEL = 1
N_SAMPLES = 32768
SETTINGS = {
    'temperature_1': Sampling(temperature=1.0),
    'cfg_top_k_top_p': Sampling(temperature=1.0, top_k=3, top_p=0.95, cfg_scale=3.0),
}
# Three drafts per pass on a row of three: horizontal drafts, vertical drafts for the next
# row, and positions no head reaches all occur.
OPTIONS = engine.Options(draft_len=3, horizontal_first=1)
_accept_exact = acceptance.accept_exact


def broken_resample_from_p(uniform, p, q, draft):
  """Rejected drafts are replaced by a draw from p instead of the residual."""
  return _accept_exact(uniform, p, q, draft)[0], p


def broken_accept_if_possible(uniform, p, q, draft):
  """Any draft the target could have produced (p(x) > 0) stands."""
  del uniform
  return jnp.take_along_axis(p, draft[..., None], -1)[..., 0] > 0, acceptance.residual(p, q)


@pytest.fixture(scope='module')
def bundle():
  """Random backbone with peaked logits; random heads, so a good share of drafts fails.

  Scaling the lm_head by 12 concentrates the mass on a few hundred of the 4096 sequences,
  which 32k samples measure well, while every token still has real randomness.
  """
  model = transformer.Transformer(vocab_size=VOCAB, num_classes=2, grid=GRID, num_layers=1,
                                  dim=DIM, num_heads=2, mlp_dim=32)
  heads = heads_lib.NeighbourHeads(num_horizontal=2, num_vertical=1, dim=DIM, mlp_dim=16)

  @jax.jit  # one compile instead of dozens of eager ones
  def init(key):
    k_model, k_heads = jax.random.split(key)
    params = sharding.strip_boxes(model.init(
        k_model, jnp.zeros((1, model.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)))
    params['params']['lm_head']['kernel'] *= 12
    return params['params'], sharding.strip_boxes(
        heads.init(k_heads, jnp.zeros((1, DIM)), jnp.zeros((1, DIM))))['params']

  params, head_params = init(jax.random.key(0))
  return pretrained.Bundle('tiny-random', None, None, model, params, heads, head_params)


ALL_SEQUENCES = np.array(list(itertools.product(range(VOCAB), repeat=GRID[0] * GRID[1])))
PLACE = VOCAB ** np.arange(GRID[0] * GRID[1])[::-1]  # sequence -> its row in ALL_SEQUENCES


@pytest.fixture(scope='module')
def exact(bundle):
  """setting name -> exact probabilities [4096] of ALL_SEQUENCES for class LABEL."""
  model, seqs = bundle.model, jnp.asarray(ALL_SEQUENCES, jnp.int32)

  @jax.jit
  def logits_of(params, label):  # teacher forcing: [4096, 6, V]
    return model.apply({'params': params}, seqs, jnp.full((len(seqs),), label))[0]

  def probs(name):
    target = target_lib.Target(model, SETTINGS[name])
    groups = [LABEL, model.null_class][:target.groups]  # [cond; uncond] as decoding runs it
    logits = jnp.stack([logits_of(bundle.params, g) for g in groups])
    per_token = jnp.take_along_axis(target.probs(logits), seqs[..., None], -1)[..., 0]
    p = np.prod(np.asarray(per_token, np.float64), -1)
    np.testing.assert_allclose(p.sum(), 1.0, atol=1e-4)
    return p / p.sum()  # float32 rounding; multinomial needs a sum <= 1
  return {name: probs(name) for name in SETTINGS}


def tv_bound(p, n, reps=300):
  """The largest TV a correct sampler plausibly shows with n samples from p.

  With n = 32768 samples spread over 4096 cells even an exact sampler's empirical TV is
  far from 0: about 0.5 * sum sqrt(2 p (1 - p) / (pi n)), here a mean of 0.096 at
  temperature 1 and 0.026 with CFG/top-k/top-p, both with sd 0.0016. Its distribution is
  that of multinomial(n, p) draws, simulated here; the TV sums many nearly independent
  cells, so it is close to normal, and mean + 6 sd is a bound a correct sampler exceeds
  with probability ~1e-9 (the seeds are fixed anyway). The broken rules below give TVs of
  0.26 and 0.84.
  """
  rng = np.random.default_rng(0)
  null = 0.5 * np.abs(rng.multinomial(n, p, size=reps) / n - p).sum(-1)
  return null.mean() + 6 * null.std()


def sampled_tv(bundle, exact, method, name):
  """(TV between N_SAMPLES decoded sequences and the exact distribution, bound, stats)."""
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  fn, params, _, _ = engine.build_decoder(bundle, method, SETTINGS[name], OPTIONS, mesh)
  tokens, stats = fn(params, jnp.full((N_SAMPLES,), LABEL, jnp.int32),
                     engine.image_keys(0, 0, N_SAMPLES))
  freq = np.bincount(np.asarray(tokens) @ PLACE, minlength=len(ALL_SEQUENCES)) / N_SAMPLES
  p = exact[name]
  return 0.5 * np.abs(freq - p).sum(), tv_bound(p, N_SAMPLES), jax.tree.map(np.asarray, stats)


@pytest.mark.parametrize('name', SETTINGS)
def test_speculative_samples_the_exact_distribution(bundle, exact, name):
  tv, bound, stats = sampled_tv(bundle, exact, 'speculative', name)
  # Share of tokens 1..5 that were accepted drafts (the rest: residual or p draws).
  accepted = stats['accepted_drafts'].sum() / (N_SAMPLES * (GRID[0] * GRID[1] - 1))
  print(f'{name}: TV {tv:.4f} (bound {bound:.4f}), accepted drafts {accepted:.2f} of tokens, '
        f'{stats["sample_passes"].mean():.2f} passes per sample')
  assert 0.2 < accepted < 0.8, 'both acceptance and rejection must be common to test both'
  assert tv <= bound


@pytest.mark.parametrize('name', SETTINGS)
def test_ar_samples_the_exact_distribution(bundle, exact, name):
  tv, bound, _ = sampled_tv(bundle, exact, 'ar', name)
  print(f'{name}: ar TV {tv:.4f} (bound {bound:.4f})')
  assert tv <= bound


@pytest.mark.parametrize('name,rule', [
    ('temperature_1', broken_resample_from_p), ('cfg_top_k_top_p', broken_accept_if_possible)])
def test_broken_acceptance_rule_exceeds_the_bound(bundle, exact, monkeypatch, name, rule):
  monkeypatch.setattr(acceptance, 'accept_exact', rule)
  tv, bound, _ = sampled_tv(bundle, exact, 'speculative', name)
  print(f'{name}, {rule.__name__}: TV {tv:.4f} (bound {bound:.4f})')
  assert tv > bound
