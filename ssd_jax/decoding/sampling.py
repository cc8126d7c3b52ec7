"""Turning logits into the distribution every method samples from and verifies against.

The SAME processing (CFG, temperature, top-k, top-p) must be applied to the target's p and
the drafter's q: a draft distribution processed differently breaks exactness. Temperature 0
is greedy: the distribution is the one-hot of the argmax, which makes the exact acceptance
rule an argmax match.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """Sampling settings as a user gives them.

  A compiled decoding loop is specialised on `static_key()` (greedy or not, CFG or not,
  top-k, top-p); a non-zero temperature and a guidance scale other than 1 enter it as
  traced values (`traced_values()`), so sweeping them does not recompile.
  """
  temperature: float = 1.0  # 0 = greedy
  top_k: int = 0            # 0 = off
  top_p: float = 1.0        # 1 = off
  cfg_scale: float = 1.0    # 1 = no guidance (no unconditional half is run)

  @property
  def greedy(self):
    return self.temperature == 0

  @property
  def uses_cfg(self):
    return self.cfg_scale != 1.0

  def validate(self, vocab_size):
    if not self.temperature >= 0:
      raise ValueError(f'--temperature={self.temperature} must be >= 0 (0 = greedy).')
    if self.top_k < 0 or self.top_k > vocab_size:
      raise ValueError(f'--top_k={self.top_k} must be in [0, {vocab_size}] (the vocabulary '
                       'size; 0 = off).')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'--top_p={self.top_p} must be in (0, 1] (1 = off).')
    if not self.cfg_scale >= 0:
      raise ValueError(f'--cfg_scale={self.cfg_scale} must be >= 0 (1 = no guidance).')
    return self

  def static_key(self):
    return (self.greedy, self.uses_cfg, self.top_k, self.top_p)

  def traced_values(self):
    """{'temperature', 'cfg_scale'} as float32 scalars (greedy ignores the temperature)."""
    return {'temperature': jnp.float32(1.0 if self.greedy else self.temperature),
            'cfg_scale': jnp.float32(self.cfg_scale)}

  def processing(self, values=None):
    """The Processing a loop applies; `values` (traced) replace temperature / cfg_scale."""
    values = values or {'temperature': self.temperature, 'cfg_scale': self.cfg_scale}
    return Processing(greedy=self.greedy, uses_cfg=self.uses_cfg, top_k=self.top_k,
                      top_p=self.top_p, **values)


@dataclasses.dataclass(frozen=True)
class Processing:
  """What a compiled loop applies to logits: static switches and (possibly traced) values."""
  greedy: bool
  uses_cfg: bool
  top_k: int
  top_p: float
  temperature: Any  # [] float; unused when greedy
  cfg_scale: Any    # [] float; unused without CFG


def guide(logits, cfg_scale):
  """[G, ...] logits (G = 2: cond, uncond) -> [...] guided logits; G = 1 passes through."""
  if logits.shape[0] == 1:
    return logits[0]
  cond, uncond = logits[0], logits[1]
  return uncond + cfg_scale * (cond - uncond)


def probs_from_logits(logits, s):
  """logits [..., V] -> probabilities [..., V] after temperature / top-k / top-p.

  `s`: a Sampling or a Processing (the same fields)."""
  logits = logits.astype(jnp.float32)
  if s.greedy:
    return jax.nn.one_hot(jnp.argmax(logits, -1), logits.shape[-1], dtype=jnp.float32)
  logits = logits / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(logits, s.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  probs = jax.nn.softmax(logits, -1)
  if s.top_p < 1.0:
    sorted_probs = jnp.sort(probs, -1)[..., ::-1]
    before = jnp.cumsum(sorted_probs, -1) - sorted_probs  # mass strictly above each one
    # Smallest kept probability: the last token whose preceding mass is still < top_p.
    cutoff = jnp.min(jnp.where(before < s.top_p, sorted_probs, 1.0), -1, keepdims=True)
    probs = jnp.where(probs >= cutoff, probs, 0.0)
    probs = probs / jnp.sum(probs, -1, keepdims=True)
  return probs


def sample(key, probs, greedy=False):
  """Draws token ids [...] from probs [..., V]; greedy takes the argmax (no randomness)."""
  if greedy:
    return jnp.argmax(probs, -1).astype(jnp.int32)
  return jax.random.categorical(key, jnp.log(probs), -1).astype(jnp.int32)
