"""Stage `tokenizer`: trains the VQ tokenizer on images (reconstruction + VQ losses)."""

import os

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import images as image_io
from ssd_jax.data import pipeline
from ssd_jax.models import vq
from ssd_jax.training import loop


def tokenizer_spec(vq_config, image_channels):
  return dict(codebook_size=vq_config.codebook_size, code_dim=vq_config.code_dim,
              channels=vq_config.channels, num_res_blocks=vq_config.num_res_blocks,
              factor=vq_config.factor, image_channels=image_channels)


def tokenizer_from_config(vq_config, image_channels):
  return vq.VQTokenizer(**tokenizer_spec(vq_config, image_channels))


def check_image_shape(data_config, factor):
  size = data_config.image_size
  if size % factor:
    raise ValueError(f'image_size={size} is not divisible by the tokenizer factor '
                     f'{factor}; choose --config.vq.factor from the divisors of {size}.')


def make_stage(config, workdir=None):
  del workdir  # The tokenizer depends on no earlier stage.
  check_image_shape(config.data, config.vq.factor)
  model = tokenizer_from_config(config.vq, config.data.channels)
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)
  num_codes = config.vq.codebook_size

  def init_params(key):
    return model.init(key, jnp.zeros(shape))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del frozen, key, extra
    images = vq.images_to_unit(batch['image'])
    recon, aux = model.apply({'params': params}, images)
    rec_loss = jnp.mean((recon - images) ** 2)
    loss = (rec_loss + config.vq.codebook_weight * aux['codebook_loss']
            + config.vq.commitment * aux['commit_loss'])
    used, perplexity = vq.codebook_usage(aux['tokens'], num_codes)
    metrics = {'rec_loss': rec_loss, 'psnr': vq.psnr(recon, images),
               'batch_code_use': used, 'perplexity': perplexity}
    return loss, (metrics, {'tokens': aux['tokens'], 'latents': aux['latents']})

  def post_update(state, aux, key):
    usage = state.extra['usage'] + jnp.bincount(aux['tokens'].reshape(-1), length=num_codes)
    latents = jax.lax.stop_gradient(aux['latents']).reshape(-1, config.vq.code_dim)
    restarted, _ = vq.restart_dead_codes(state.params['codebook'], usage, latents, key)
    due = (state.step % config.vq.restart_every == 0) & (state.step > 0)
    codebook = jnp.where(due, restarted, state.params['codebook'])
    usage = jnp.where(due, jnp.zeros_like(usage), usage)
    params = dict(state.params, codebook=codebook)
    return state.replace(params=params, extra={'usage': usage})

  def evaluate(params, frozen, stage_dir, mesh):
    del frozen, mesh
    data = pipeline.load_arrays(config.data, config.data.eval_split, config.eval_examples)
    return evaluate_tokenizer(model, params, data['image'], stage_dir)

  return loop.Stage(name='tokenizer', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate, post_update=post_update,
                    spec={'tokenizer': tokenizer_spec(config.vq, config.data.channels)},
                    init_extra=lambda p: {'usage': jnp.zeros((num_codes,), jnp.int32)})


def evaluate_tokenizer(model, params, images_uint8, out_dir, batch_size=500):
  """PSNR and codebook use on held-out images; writes originals above reconstructions."""

  @jax.jit
  def reconstruct(x):
    images = vq.images_to_unit(x)
    tokens = model.apply({'params': params}, images, method=model.encode)
    recon = model.apply({'params': params}, tokens, method=model.decode)
    return tokens, vq.psnr(recon, images) * x.shape[0], vq.unit_to_uint8(recon)

  all_tokens, psnr_sum, shown = [], 0.0, None
  for i in range(0, len(images_uint8), batch_size):
    tokens, psnr_total, recon = reconstruct(images_uint8[i:i + batch_size])
    all_tokens.append(np.asarray(tokens))
    psnr_sum += float(psnr_total)
    if shown is None:
      shown = np.asarray(recon[:16])
  tokens = np.concatenate(all_tokens)
  used, perplexity = vq.codebook_usage(jnp.asarray(tokens), model.codebook_size)
  image_io.save_grid(os.path.join(out_dir, 'reconstructions.png'),
                     np.concatenate([images_uint8[:16], shown]), ncols=16)
  return {'psnr': psnr_sum / len(images_uint8), 'code_use': float(used),
          'perplexity': float(perplexity), 'num_images': len(images_uint8),
          'grid': list(tokens.shape[1:])}
