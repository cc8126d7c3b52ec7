"""VQ tokenizer: conv encoder/decoder with residual blocks and a cosine-lookup codebook.

Downsampling is a space-to-depth by `factor` (cheap, and XLA's CPU convolutions are the
bottleneck here), followed by 3x3 convs at that resolution. Codes are looked up by cosine
similarity between l2-normalised latents and codes, which keeps most codes in use; dead
codes are restarted by the training step (see `restart_dead_codes`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def space_to_depth(x, f):  # [B, H, W, C] -> [B, H/f, W/f, f*f*C]
  b, h, w, c = x.shape
  x = x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // f, w // f, f * f * c)


def depth_to_space(x, f):  # [B, h, w, f*f*C] -> [B, h*f, w*f, C]
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, f, f, c // (f * f)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * f, w * f, c // (f * f))


def l2_normalize(x, eps=1e-6):
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    y = nn.Conv(self.channels, (3, 3))(nn.gelu(nn.GroupNorm(num_groups=8)(x)))
    y = nn.Conv(self.channels, (3, 3))(nn.gelu(nn.GroupNorm(num_groups=8)(y)))
    return x + y


class Encoder(nn.Module):
  channels: int
  num_res_blocks: int
  factor: int
  code_dim: int

  @nn.compact
  def __call__(self, images):  # [B, H, W, C] in [-1, 1] -> [B, h, w, code_dim]
    x = nn.Conv(self.channels, (3, 3))(space_to_depth(images, self.factor))
    for _ in range(self.num_res_blocks):
      x = ResBlock(self.channels)(x)
    return nn.Conv(self.code_dim, (1, 1))(nn.gelu(nn.GroupNorm(num_groups=8)(x)))


class Decoder(nn.Module):
  channels: int
  num_res_blocks: int
  factor: int
  image_channels: int

  @nn.compact
  def __call__(self, z):  # [B, h, w, code_dim] -> [B, H, W, C]
    x = nn.Conv(self.channels, (3, 3))(z)
    for _ in range(self.num_res_blocks):
      x = ResBlock(self.channels)(x)
    x = nn.gelu(nn.GroupNorm(num_groups=8)(x))
    x = nn.Conv(self.factor * self.factor * self.image_channels, (3, 3))(x)
    return depth_to_space(x, self.factor)


class VQTokenizer(nn.Module):
  """images [B, H, W, C] in [-1, 1] <-> tokens [B, H/f, W/f] int32."""
  codebook_size: int = 512
  code_dim: int = 16
  channels: int = 32
  num_res_blocks: int = 2
  factor: int = 2
  image_channels: int = 1

  def setup(self):
    self.encoder = Encoder(self.channels, self.num_res_blocks, self.factor, self.code_dim)
    self.decoder = Decoder(self.channels, self.num_res_blocks, self.factor,
                           self.image_channels)
    self.codebook = self.param('codebook', nn.initializers.normal(1.0),
                               (self.codebook_size, self.code_dim))

  def codes(self):  # [K, code_dim], unit norm
    return l2_normalize(self.codebook)

  def latents(self, images):  # [B, h, w, code_dim], unit norm
    return l2_normalize(self.encoder(images))

  def lookup(self, z):  # z [B, h, w, d] -> tokens [B, h, w]
    return jnp.argmax(z @ self.codes().T, axis=-1).astype(jnp.int32)

  def encode(self, images):
    return self.lookup(self.latents(images))

  def decode(self, tokens):  # [B, h, w] -> [B, H, W, C]
    return self.decoder(self.codes()[tokens])

  def __call__(self, images):
    """Reconstruction with a straight-through estimator; returns (recon, aux)."""
    z = self.latents(images)
    tokens = self.lookup(z)
    zq = self.codes()[tokens]
    # Codebook term pulls codes to latents; commitment term pulls latents to codes.
    codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - zq) ** 2, -1))
    commit_loss = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(zq)) ** 2, -1))
    zq_st = z + jax.lax.stop_gradient(zq - z)
    recon = self.decoder(zq_st)
    return recon, {'tokens': tokens, 'latents': z, 'codebook_loss': codebook_loss,
                   'commit_loss': commit_loss}


def images_to_unit(images_uint8):  # uint8 [0, 255] -> float32 [-1, 1]
  return images_uint8.astype(jnp.float32) / 127.5 - 1.0


def unit_to_uint8(x):  # float [-1, 1] -> uint8 (numpy or jax)
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def psnr(recon, target):
  """PSNR in dB of [-1, 1] images, measured on the [0, 1] scale; mean over the batch."""
  mse = jnp.mean(((recon - target) / 2.0) ** 2, axis=(1, 2, 3))
  return jnp.mean(-10.0 * jnp.log10(jnp.maximum(mse, 1e-10)))


def codebook_usage(tokens, codebook_size):
  """(fraction of codes used, perplexity) of a token array."""
  counts = jnp.bincount(tokens.reshape(-1), length=codebook_size)
  probs = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.maximum(probs, 1e-12)), 0.0))
  return jnp.mean(counts > 0), jnp.exp(entropy)


def restart_dead_codes(codebook, usage, latents, key):
  """Re-initialises codes unused since the last restart to random current latents.

  codebook [K, d]; usage [K] counts since the last restart; latents [M, d] from the batch.
  """
  dead = usage == 0
  picks = jax.random.randint(key, (codebook.shape[0],), 0, latents.shape[0])
  fresh = latents[picks] + 0.01 * jax.random.normal(key, codebook.shape)
  return jnp.where(dead[:, None], fresh, codebook), jnp.sum(dead)
