"""Frechet distance between two sets of features (FID when the features are Inception's).

FID = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to the two
feature sets. It is biased upwards at small sample sizes and depends on the feature space,
so compare numbers only at the same number of images and the same extractor; bench.py
states the noise level (AR against AR with another seed) next to every comparison, each
with a bootstrap interval.
"""

import warnings

import numpy as np
import scipy.linalg


def statistics(features):
  """features [N, F] -> (mean [F], covariance [F, F]) in float64."""
  x = np.asarray(features, np.float64)
  if x.ndim != 2 or len(x) < 2:
    raise ValueError(f'FID needs features of shape [N >= 2, F], got {x.shape}.')
  return x.mean(0), np.atleast_2d(np.cov(x, rowvar=False))


def _sqrtm(m):
  # A singular product is normal (features that never fire, fewer images than features):
  # scipy warns, but its square root is still right; the checks below catch real failures.
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(m)


def frechet_distance(mu_a, cov_a, mu_b, cov_b, eps=1e-6):
  diff = mu_a - mu_b
  covmean = _sqrtm(cov_a @ cov_b)
  if not np.all(np.isfinite(covmean)):
    # Singular product (fewer images than features): regularise both covariances a little.
    offset = np.eye(len(cov_a)) * eps
    covmean = _sqrtm((cov_a + offset) @ (cov_b + offset))
  if np.iscomplexobj(covmean):
    # Round-off makes the square root of a PSD product slightly complex; a large imaginary
    # part means the statistics themselves are broken.
    imag = np.max(np.abs(covmean.imag))
    if imag > 1e-3 * max(1.0, np.max(np.abs(covmean.real))):
      warnings.warn(f'FID: matrix square root has an imaginary part of {imag:.3g}; too few '
                    'images for the feature dimension? The real part is used.')
    covmean = covmean.real
  return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def fid(features_a, features_b):
  """Frechet distance between feature sets [N_a, F] and [N_b, F]."""
  stats_a, stats_b = statistics(features_a), statistics(features_b)
  if stats_a[0].shape != stats_b[0].shape:
    raise ValueError(f'feature dimensions differ: {stats_a[0].shape[0]} vs '
                     f'{stats_b[0].shape[0]}; use one extractor for both sets.')
  return frechet_distance(*stats_a, *stats_b)


def _interval(values, level):
  tail = 50.0 * (1.0 - level)
  lo, hi = np.percentile(values, [tail, 100.0 - tail])
  return float(lo), float(hi)


def _check(resamples, level):
  if resamples < 1 or not 0 < level < 1:
    raise ValueError(f'FID intervals: need resamples >= 1 and 0 < level < 1, got '
                     f'{resamples} and {level}.')


def bootstrap_interval(features_a, features_b, resamples, level=0.9, seed=0, paired=False):
  """(lo, hi): a `level` bootstrap interval of fid(features_a, features_b), centred on it.

  Each resample draws both sets with replacement, as many rows as each has: independently,
  or with `paired` (sets of equal size whose row i belong together, e.g. the same class) the
  same rows of both, which keeps what pairs them (the class mix) equal in both.
  A resample holds only ~63% distinct rows, which inflates FID (at 256 images of 128
  features by about the FID itself), so the raw percentile interval would not even contain
  the point value; the interval is shifted by that bias (the resamples' median minus the
  point value): it shows the spread, around the value measured. The same seed gives the
  same interval.
  """
  _check(resamples, level)
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if paired and len(a) != len(b):
    raise ValueError(f'bootstrap_interval: paired sets of equal size, got {len(a)} and '
                     f'{len(b)}.')
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(resamples):
    ia = rng.integers(0, len(a), len(a))
    values.append(fid(a[ia], b[ia if paired else rng.integers(0, len(b), len(b))]))
  bias = float(np.median(values)) - fid(a, b)
  lo, hi = _interval(values, level)
  return lo - bias, hi - bias


def null_interval(features_a, features_b, resamples, level=0.9, seed=0):
  """(lo, hi): the central `level` interval of FID between two samples of ONE distribution.

  features_a and features_b ([n, F] each) are two samples of the same distribution (AR at
  two seeds) whose row i belong together (the same class): each resample swaps every pair
  (a_i, b_i) between the two sets with probability 1/2, `resamples` times. Each one's FID is
  what two independent n-image samples with that class mix give, so the interval is the
  spread of the noise level itself, at the same n (no duplicated rows, no bias; swapping
  within pairs keeps the class mix of both halves equal, as in the runs compared). A
  method's FID vs AR above `hi` is more than sampling noise explains. The same seed gives
  the same interval.
  """
  _check(resamples, level)
  a, b = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64)
  if len(a) != len(b):
    raise ValueError(f'null_interval: two samples of equal size, got {len(a)} and {len(b)}.')
  rng = np.random.default_rng(seed)
  values = []
  for _ in range(resamples):
    swap = rng.random(len(a))[:, None] < 0.5
    values.append(fid(np.where(swap, b, a), np.where(swap, a, b)))
  return _interval(values, level)
