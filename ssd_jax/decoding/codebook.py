"""The tokenizer's codebook as decoding constants (GSD, LANTERN and MuLo-SD measure in it).

Builders run while the decoding loop is traced; these values depend only on the loaded
tokenizer, so they are computed eagerly (outside the traced computation) once per bundle
and enter the loop as constants.
"""

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax.decoding import acceptance


def _cached(bundle, key, fn):
  cache = bundle.constants
  if key not in cache:
    with jax.ensure_compile_time_eval():
      cache[key] = fn()
  return cache[key]


def codes(bundle):
  """The tokenizer's unit-norm codes [V, d]."""
  stage = bundle.stage('tokenizer')
  return _cached(bundle, 'codes', lambda: stage.module.apply(
      {'params': stage.params}, method=stage.module.codes))


def neighbours(bundle, k):
  """[V, k] int32: each code's k nearest other codes, nearest first (k = 0: none)."""
  vocab = bundle.model.vocab_size
  if k == 0:
    return jnp.zeros((vocab, 0), jnp.int32)
  return _cached(bundle, ('neighbours', k),
                 lambda: acceptance.latent_neighbours(codes(bundle), k))


def within(bundle, threshold, chunk=1024):
  """[V, m] int32: for each code, the other codes at squared distance < threshold, nearest
  first, -1 padded (m = the most any code has; at least 1). Computed on the host in row
  chunks, so a 16384-code book needs no V x V array."""
  def compute():
    c = np.asarray(codes(bundle), np.float32)
    sq = np.sum(c * c, -1)
    rows = []
    for start in range(0, len(c), chunk):
      d = sq[start:start + chunk, None] + sq[None] - 2.0 * c[start:start + chunk] @ c.T
      d[np.arange(len(d)), start + np.arange(len(d))] = np.inf  # not the code itself
      order = np.argsort(d, -1, kind='stable')
      rows += [o[dist[o] < threshold] for o, dist in zip(order, d)]
    width = max(1, max(len(r) for r in rows))
    return jnp.asarray(np.stack([np.pad(r, (0, width - len(r)), constant_values=-1)
                                 for r in rows]).astype(np.int32))
  return _cached(bundle, ('within', float(threshold)), compute)
