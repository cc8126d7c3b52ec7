"""Class accuracy and target NLL of generated samples.

Class accuracy: the fraction of samples that the classifier assigns to the class they were
generated for (does the image show the requested class).

Target NLL: -log2 p(token | earlier tokens, class) of the generated tokens, averaged over
all tokens of all images, under the AR model with teacher forcing, CONDITIONAL (the
requested class), WITHOUT CFG and at temperature 1, whatever the samples were generated
with. It is the model's own judgement of the samples: a method that drifts from the
model's distribution gets tokens the model finds unlikely. Samples drawn with CFG or a
lower temperature are expected to have a lower NLL than plain samples; compare methods
at the same sampling settings.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax.eval import features as features_lib


def class_accuracy(predicted, requested):
  """Fraction of samples whose predicted class id equals the requested one."""
  predicted, requested = np.asarray(predicted), np.asarray(requested)
  if predicted.shape != requested.shape:
    raise ValueError(f'{predicted.shape} predictions for {requested.shape} requested classes.')
  return float(np.mean(predicted == requested))


def token_nll_bits_fn(model, params, batch_size=64):
  """fn(tokens [N, H, W], labels [N]) -> mean NLL in bits per token (compiled once)."""

  @jax.jit
  def nll(batch):  # [B, N + 1] (tokens, label) -> [B] summed nats
    toks, lab = batch[:, :-1], batch[:, -1]
    logits, _ = model.apply({'params': params}, toks, lab)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, toks), -1)

  def mean_bits(tokens, labels):
    tokens = np.asarray(tokens).reshape(len(tokens), -1).astype(np.int32)
    data = np.concatenate([tokens, np.asarray(labels, np.int32)[:, None]], axis=1)
    per_image = features_lib.batched(nll, data, batch_size)
    return float(np.sum(per_image) / tokens.size / math.log(2))
  return mean_bits


def check_fits(bundle, judge):
  """Raises ValueError when the classifier cannot judge this checkpoint's images."""
  grid = tuple(bundle.model.grid)
  size = grid[0] * bundle.tokenizer.factor
  module = judge.module
  if grid[0] != grid[1] or size != module.image_size or (
      bundle.tokenizer.image_channels != module.image_channels):
    raise ValueError(
        f'{bundle.run_dir} makes {grid[0]}x{grid[1]} token grids, i.e. '
        f'{grid[0] * bundle.tokenizer.factor}x{grid[1] * bundle.tokenizer.factor}x'
        f'{bundle.tokenizer.image_channels} images, but the classifier in {judge.stage_dir} '
        f'takes {module.image_size}x{module.image_size}x{module.image_channels}; pass '
        '--classifier=DIR with one trained on the same dataset.')
  if bundle.model.num_classes != module.num_classes:
    raise ValueError(f'{bundle.run_dir} has {bundle.model.num_classes} classes but the '
                     f'classifier in {judge.stage_dir} has {module.num_classes}; pass '
                     '--classifier=DIR with one trained on the same dataset.')
