"""The tokenizer's codebook as decoding constants (GSD, LANTERN and MuLo-SD measure in it).

Builders run while the decoding loop is traced; these values depend only on the loaded
tokenizer, so they are computed eagerly (outside the traced computation) once per bundle
and enter the loop as constants.
"""

import jax
import jax.numpy as jnp

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
