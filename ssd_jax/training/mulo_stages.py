"""Stages `mulo_draft` and `mulo_upsampler`: MuLo-SD's low-resolution drafter and upsampler.

Both train on token grids of the frozen tokenizer (encoded per batch, or read from the token
cache with --config.data.pretokenize: ssd_jax/training/inputs.py); neither needs the target
AR model. A data grid [B, 14, 14] is pooled to [B, 7, 7] (`models.mulo.pool_tokens`, factor
`config.factor`). `mulo_draft` is a small class-conditional AR transformer on the pooled
grids (next-token loss, label dropout for CFG); `mulo_upsampler` learns p(fine grid |
pooled grid, class), a cross-entropy at every fine position against the real grid.
"""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax import images as image_io
from ssd_jax import pretrained
from ssd_jax.data import fashion_mnist
from ssd_jax.models import mulo
from ssd_jax.models import vq
from ssd_jax.training import ar_stage
from ssd_jax.training import inputs as inputs_lib
from ssd_jax.training import loop


def make_stage(config, workdir):
  tok_dir = ar_stage.earlier_stage_dir(config.tokenizer_dir, workdir, 'tokenizer')
  tokenizer, tok_params, tok_spec = pretrained.load_stage(tok_dir, 'tokenizer')
  size = config.data.image_size // tokenizer.factor
  if size % config.factor:
    raise ValueError(f'--config.factor={config.factor} does not divide the tokenizer\'s '
                     f'{size}x{size} grid.')
  # StageInputs reads a backbone's grid and classes; these stages have no backbone: the
  # tokenizer's grid at data.image_size and the dataset's classes stand in for them.
  data_grid = types.SimpleNamespace(grid=(size, size), num_classes=config.data.num_classes)
  inputs = inputs_lib.StageInputs(config, workdir, tokenizer, tok_spec, tok_params, data_grid,
                                  log=loop.log)

  def grids(tok_params, batch):  # a batch -> (fine [B, H*W], low [B, h*w]) int32
    fine = inputs.grids(tok_params, batch)
    codes = tokenizer.apply({'params': tok_params}, method=tokenizer.codes)
    low = mulo.pool_tokens(fine.reshape(-1, size, size), codes, config.factor)
    return fine, low.reshape(low.shape[0], -1)

  common = dict(vocab_size=tokenizer.codebook_size, num_classes=config.data.num_classes)
  names = (list(fashion_mnist.CLASS_NAMES) if config.data.name == 'fashion_mnist_local'
           else [])
  # The tokenizer stays frozen on the devices even with cached tokens: pooling needs its
  # codebook, the evaluations its decoder.
  frozen = {'tokenizer': tok_params}
  if config.stage == 'mulo_draft':
    low = size // config.factor
    spec = dict(common, grid=[low, low], **config.model.to_dict())
    return _draft_stage(config, tokenizer, grids, spec, frozen, names, inputs)
  spec = dict(common, grid=[size, size], factor=config.factor, **config.model.to_dict())
  return _upsampler_stage(config, tokenizer, grids, spec, frozen, inputs)


def _xent(logits, tokens):
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens)


def _draft_stage(config, tokenizer, grids, spec, frozen, names, inputs):
  model = pretrained.transformer_module({'transformer': spec})

  def init_params(key):
    n = model.num_tokens
    return model.init(key, jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del extra
    _, low = grids(frozen['tokenizer'], batch)
    logits, _ = model.apply({'params': params}, low, batch['label'], train=True,
                            rngs={'dropout': key})
    nll = jnp.mean(_xent(logits, low))
    acc = jnp.mean(jnp.argmax(logits, -1) == low)
    return nll, ({'bits_per_token': nll / math.log(2), 'accuracy': acc}, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del mesh
    data = inputs.eval_data()
    key = 'tokens' if 'tokens' in data else 'image'
    # validation_bits slices data['image'] and encodes it: here images or cached tokens.
    low_grid = lambda tok_params, x: grids(tok_params, {key: x})[1]
    bits = ar_stage.validation_bits(model, params, low_grid, frozen['tokenizer'],
                                    {'image': data[key], 'label': data['label']})
    if config.samples_per_class:
      # The tokenizer decodes a 7x7 grid into a 14x14 preview of each sample.
      bundle = pretrained.Bundle(stage_dir, tokenizer, frozen['tokenizer'], model, params)
      ar_stage.write_class_grid(bundle, os.path.join(stage_dir, 'samples.png'),
                                config.sample_cfg_scale, per_class=config.samples_per_class,
                                seed=config.seed)
    return {'val_bits_per_token': bits}

  return loop.Stage(name='mulo_draft', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate, frozen=frozen,
                    spec={'transformer': spec, 'factor': config.factor, 'class_names': names},
                    num_heads=spec['num_heads'], train_source=inputs.train_source)


def _upsampler_stage(config, tokenizer, grids, spec, frozen, inputs):
  model = mulo.upsampler_module({'upsampler': spec})

  def init_params(key):
    return model.init(key, *mulo.upsampler_init_args(model))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del extra
    fine, low = grids(frozen['tokenizer'], batch)
    logits = model.apply({'params': params}, low, batch['label'], train=True,
                         rngs={'dropout': key})
    nll = jnp.mean(_xent(logits, fine))
    acc = jnp.mean(jnp.argmax(logits, -1) == fine)
    return nll, ({'bits_per_token': nll / math.log(2), 'accuracy': acc}, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del mesh
    results, examples = evaluate_upsampler(model, params, tokenizer, frozen['tokenizer'],
                                           grids, inputs.eval_data())
    image_io.save_grid(os.path.join(stage_dir, 'upsampled.png'), examples,
                       ncols=len(examples) // 3)
    return results

  return loop.Stage(name='mulo_upsampler', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate, frozen=frozen, spec={'upsampler': spec},
                    num_heads=spec['num_heads'], train_source=inputs.train_source)


def evaluate_upsampler(model, params, tokenizer, tok_params, grids, data, batch_size=250,
                       num_examples=10):
  """Held-out token accuracy of the upsampler's argmax against the real grid (and of
  copying each pooled token to its f x f block, the baseline it has to beat), bits/token,
  and PSNR of the decoded upsampled grid against the images (the tokenizer's own
  reconstruction bounds it; with cached tokens, which have no images, against that
  reconstruction, as psnr_upsampled_vs_reconstruction). Also rows of examples: tokenizer
  reconstruction, pooled copy, upsampled. `grids` maps a batch of `data` ({'image' or
  'tokens', 'label'}) to (fine, pooled) grids."""
  (h, w), f = model.grid, model.factor
  decode = lambda t: tokenizer.apply({'params': tok_params}, t.reshape(-1, h, w),
                                     method=tokenizer.decode)

  @jax.jit
  def batch_stats(batch):
    fine, low = grids(tok_params, batch)
    logits = model.apply({'params': params}, low, batch['label'])
    pred = jnp.argmax(logits, -1)
    copy = jnp.repeat(jnp.repeat(low.reshape(-1, h // f, w // f), f, 1), f, 2).reshape(
        fine.shape)
    recon, fine_recon = decode(pred), decode(fine)
    target = vq.images_to_unit(batch['image']) if 'image' in batch else fine_recon
    return (jnp.sum(pred == fine), jnp.sum(copy == fine), jnp.sum(_xent(logits, fine)),
            vq.psnr(recon, target) * fine.shape[0], (fine_recon, decode(copy), recon))

  sums = np.zeros(4)
  examples = None
  count = len(data['label'])
  for i in range(0, count, batch_size):
    *stats, images = batch_stats({k: v[i:i + batch_size] for k, v in data.items()})
    sums += np.asarray([float(x) for x in stats])
    if examples is None:
      examples = np.concatenate([np.asarray(vq.unit_to_uint8(x[:num_examples]))
                                 for x in images])
  tokens = count * h * w
  return {'token_accuracy': sums[0] / tokens, 'copy_token_accuracy': sums[1] / tokens,
          'val_bits_per_token': sums[2] / tokens / math.log(2),
          ('psnr_upsampled' if 'image' in data else 'psnr_upsampled_vs_reconstruction'):
          sums[3] / count}, examples
