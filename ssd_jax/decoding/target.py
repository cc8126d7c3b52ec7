"""The target model as the decoding methods see it: CFG folded in, probabilities out.

With CFG the model runs one doubled batch [cond; uncond] (G = 2 groups); callers see
guided, processed probabilities [B, ...] and, for drafters that need them, the hidden
states of both groups [G, B, ...] so a draft distribution can be guided the same way.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.models import transformer


@dataclasses.dataclass(frozen=True)
class Target:
  model: transformer.Transformer
  sampling: Any  # a sampling_lib.Processing (a Sampling is converted)
  dtype: Any = jnp.float32  # of the KV cache (the parameters' dtype sets the activations')

  def __post_init__(self):
    if isinstance(self.sampling, sampling_lib.Sampling):
      object.__setattr__(self, 'sampling', self.sampling.processing())

  @property
  def groups(self):
    return 2 if self.sampling.uses_cfg else 1

  @property
  def prefix_len(self):
    return self.model.prefix_len

  def _apply(self, params, *args, method):
    return self.model.apply({'params': params}, *args, method=method)

  def _tile(self, x):  # [B, ...] -> [G*B, ...]
    return jnp.concatenate([x] * self.groups, axis=0)

  def _split(self, x):  # [G*B, ...] -> [G, B, ...]
    return x.reshape((self.groups, -1) + x.shape[1:])

  def init_cache(self, batch, extra_slots=0):
    return self.model.init_cache(self.groups * batch, extra_slots, self.dtype)

  def commit(self, cache, length):
    """Sets the committed length [B] of every group's copy of each sample."""
    return cache.commit(self._tile(jnp.asarray(length, jnp.int32)))

  def probs(self, logits):
    """[G, B, ..., V] raw logits -> guided, processed probabilities [B, ..., V]."""
    return sampling_lib.probs_from_logits(
        sampling_lib.guide(logits, self.sampling.cfg_scale), self.sampling)

  def prefill(self, params, labels, cache):
    """labels [B] -> (probs of token 0 [B, V], hidden [G, B, D], cache)."""
    all_labels = labels
    if self.groups == 2:
      all_labels = jnp.concatenate([labels, jnp.full_like(labels, self.model.null_class)])
    cond = self._apply(params, all_labels, method=self.model.condition)
    logits, hidden, cache = self._apply(params, cond, cache, method=self.model.prefill)
    return self.probs(self._split(logits[:, 0])), self._split(hidden[:, 0]), cache

  def forward(self, params, tokens, slots, cache, block_mask=None, rope_pos=None,
              visible=None):
    """tokens, slots [B, T] -> (probs [B, T, V], hidden [G, B, T, D], cache).

    block_mask [T, T] / [B, T, T], rope_pos (rows, cols) [B, T] and visible [B, T, S]
    are passed to Transformer.decode (per-sample ones tiled over the CFG groups).
    """
    if rope_pos is not None:
      rope_pos = tuple(self._tile(p) for p in rope_pos)
    if block_mask is not None and block_mask.ndim == 3:
      block_mask = self._tile(block_mask)
    if visible is not None:
      visible = self._tile(visible)
    logits, hidden, cache = self._apply(
        params, self._tile(tokens), self._tile(slots), cache, block_mask, rope_pos, visible,
        method=self.model.decode)
    return self.probs(self._split(logits)), self._split(hidden), cache

  def embed(self, params, tokens):
    return self._apply(params, tokens, method=self.model.embed_tokens)

  def draft_probs(self, params, hidden):
    """Predicted hidden states [G, B, ..., D] -> draft probabilities [B, ..., V]."""
    return self.probs(self._apply(params, hidden, method=self.model.logits_from_hidden))


  def sample(self, keys, probs):
    """keys [B] (or [B, T] with probs [B, T, V]), probs [B, ..., V] -> tokens [B, ...];
    the argmax at temperature 0."""
    if self.sampling.greedy:
      return sampling_lib.sample(None, probs, greedy=True)
    if keys.ndim == 2:
      return jax.vmap(jax.vmap(sampling_lib.sample))(keys, probs)
    return jax.vmap(sampling_lib.sample)(keys, probs)
