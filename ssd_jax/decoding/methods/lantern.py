"""LANTERN: speculative decoding with neighbour-head drafts and relaxed acceptance. LOSSY.

A draft x stands with probability min(1, (p(x) + pooled) / q(x)), `pooled` being the
target mass of x's nearest codes in the tokenizer's latent space, taken nearest first while
the total stays <= delta (acceptance.accept_relaxed). delta = 0 is exact speculative
decoding, token for token.
"""

import dataclasses
import functools

from ssd_jax.decoding import acceptance
from ssd_jax.decoding import codebook
from ssd_jax.decoding import drafts
from ssd_jax.decoding import registry
from ssd_jax.decoding.methods import speculative


@dataclasses.dataclass(frozen=True)
class Options(drafts.HeadOptions):
  # ~6% of the 512 codes, as the paper's 1000 of 16384.
  k: int = registry.option(32, 'Latent neighbours per code.')
  delta: float = registry.option(0.1, 'Most target mass pooled over them (the paper\'s '
                                 '0.1; 0 = exact speculative decoding).')

  def validate(self, bundle):
    super().validate(bundle)
    vocab = bundle.model.vocab_size if bundle is not None else None
    registry.check(self.k >= 1, 'k', self.k, 'must be >= 1.')
    registry.check(vocab is None or self.k < vocab, 'k', self.k,
                   f'must be < {vocab} (the codebook size: the neighbours are the other '
                   'codes).')
    registry.check(0 <= self.delta <= 1, 'delta', self.delta,
                   'must be in [0, 1] (a probability mass; 0 = exact speculative decoding).')


def build(bundle, target, options):
  rule = functools.partial(acceptance.accept_relaxed, delta=options.delta,
                           neighbours=codebook.neighbours(bundle, options.k))
  drafter = drafts.head_drafter(bundle, target, options)
  return lambda params, labels, keys: speculative.decode_speculative(
      target, drafter, params, labels, keys, options.draft_len, rule=rule)


METHODS = (registry.Method(
    'lantern', 'LANTERN relaxed acceptance over latent neighbours, head drafts (LOSSY)',
    lossless=False, needs=('heads', 'tokenizer'), options=Options, build=build,
    block_tokens=lambda options, grid: options.draft_len + 1),)
