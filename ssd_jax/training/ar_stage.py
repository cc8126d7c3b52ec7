"""Stage `ar`: the class-conditional AR transformer on token grids of the frozen tokenizer."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax import images as image_io
from ssd_jax import pretrained
from ssd_jax.data import fashion_mnist
from ssd_jax.data import pipeline
from ssd_jax.decoding.methods import ar as ar_decoding
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import vq


def earlier_stage_dir(config_dir, workdir, stage):
  """An earlier stage's folder: the config's path if set, else <workdir>/<stage>."""
  path = config_dir or os.path.join(workdir, stage)
  if not os.path.exists(os.path.join(path, 'model.json')):
    raise FileNotFoundError(
        f'{path} holds no trained {stage!r} stage (no model.json). Train it first with '
        f'`python train.py --config=configs/{stage}.py --workdir={workdir}`, or point '
        f'--config.{stage}_dir at one.')
  return path


def transformer_spec(config, tokenizer, image_size):
  grid = image_size // tokenizer.factor
  return dict(vocab_size=tokenizer.codebook_size, num_classes=config.data.num_classes,
              grid=[grid, grid], **config.model.to_dict())


def encode_fn(tokenizer):
  def encode(tok_params, images_uint8):  # [B, H, W, C] -> [B, N] int32
    tokens = tokenizer.apply({'params': tok_params}, vq.images_to_unit(images_uint8),
                             method=tokenizer.encode)
    return tokens.reshape(tokens.shape[0], -1)
  return encode


def make_stage(config, workdir):
  tok_dir = earlier_stage_dir(config.tokenizer_dir, workdir, 'tokenizer')
  tokenizer, tok_params, _ = pretrained.load_stage(tok_dir, 'tokenizer')
  spec = transformer_spec(config, tokenizer, config.data.image_size)
  model = pretrained.transformer_module({'transformer': spec})
  encode = encode_fn(tokenizer)
  n = model.num_tokens

  def init_params(key):
    return model.init(key, jnp.zeros((1, n), jnp.int32), jnp.zeros((1,), jnp.int32))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del extra
    tokens = encode(frozen['tokenizer'], batch['image'])
    logits, _ = model.apply({'params': params}, tokens, batch['label'], train=True,
                            rngs={'dropout': key})
    nll = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))
    acc = jnp.mean(jnp.argmax(logits, -1) == tokens)
    return nll, ({'bits_per_token': nll / math.log(2), 'accuracy': acc}, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del mesh
    data = pipeline.load_arrays(config.data, config.data.eval_split, config.eval_examples)
    results = {'val_bits_per_token': validation_bits(model, params, encode, frozen['tokenizer'],
                                                      data)}
    bundle = pretrained.Bundle(stage_dir, tokenizer, frozen['tokenizer'], model, params)
    write_class_grid(bundle, os.path.join(stage_dir, 'samples.png'), config.sample_cfg_scale,
                     per_class=config.samples_per_class, seed=config.seed)
    return results

  spec_json = {'transformer': spec, 'class_names': list(fashion_mnist.CLASS_NAMES)
               if config.data.name == 'fashion_mnist_local' else []}
  return _stage('ar', init_params, loss_fn, evaluate, {'tokenizer': tok_params}, spec_json,
                spec['num_heads'])


def _stage(name, init_params, loss_fn, evaluate, frozen, spec, num_heads):
  from ssd_jax.training import loop  # pylint: disable=g-import-not-at-top
  return loop.Stage(name=name, init_params=init_params, loss_fn=loss_fn, evaluate=evaluate,
                    frozen=frozen, spec=spec, num_heads=num_heads)


def validation_bits(model, params, encode, tok_params, data, batch_size=250):
  @jax.jit
  def nll_sum(images, labels):
    tokens = encode(tok_params, images)
    logits, _ = model.apply({'params': params}, tokens, labels)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))

  total = sum(float(nll_sum(data['image'][i:i + batch_size], data['label'][i:i + batch_size]))
              for i in range(0, len(data['label']), batch_size))
  return total / (len(data['label']) * model.num_tokens) / math.log(2)


def write_class_grid(bundle, path, cfg_scale, per_class=10, seed=0):
  """Plain-AR samples, one row per class, written as a PNG."""
  model = bundle.model
  sampling = sampling_lib.Sampling(temperature=1.0, cfg_scale=cfg_scale)
  target = target_lib.Target(model, sampling)
  labels = jnp.repeat(jnp.arange(model.num_classes), per_class)
  keys = jax.random.split(jax.random.key(seed), labels.shape[0])
  tokens, _ = jax.jit(lambda p, l, k: ar_decoding.decode_ar(target, p, l, k))(
      bundle.params, labels, keys)
  images = bundle.decode_images(np.asarray(tokens).reshape(-1, *model.grid))
  image_io.save_grid(path, images, ncols=per_class)
  return images
