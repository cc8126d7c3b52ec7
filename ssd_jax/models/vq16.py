"""LlamaGen's VQ-16 image tokenizer (`vq_ds16_c2i`), for decoding imported models' tokens.

The architecture of LlamaGen's tokenizer/tokenizer_image/vq_model.py (taming-style conv
encoder/decoder, one attention block per residual block at the lowest resolution and one
in the middle, GroupNorm(32, eps 1e-6), swish), with codes looked up by l2-normalised
distance. Submodule names mirror LlamaGen's state-dict keys (`conv_blocks_2/res_1/conv1` for
`conv_blocks.2.res.1.conv1`) so the importer maps them mechanically. Inference only:
training a VQ-16 is LlamaGen's job. Same methods as vq.VQTokenizer (encode / decode / codes).
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

PAD_SAME = ((1, 1), (1, 1))  # torch's padding=1 for 3x3 convs


def l2_normalize(x):  # torch.nn.functional.normalize: x / max(|x|, 1e-12)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def group_norm(name):
  # The two-pass variance, as torch computes it (E[x^2] - E[x]^2 cancels where means are large).
  return nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):  # [B, H, W, C_in] -> [B, H, W, channels]
    h = nn.Conv(self.channels, (3, 3), padding=PAD_SAME, name='conv1')(
        nn.swish(group_norm('norm1')(x)))
    h = nn.Conv(self.channels, (3, 3), padding=PAD_SAME, name='conv2')(
        nn.swish(group_norm('norm2')(h)))
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), name='nin_shortcut')(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over all positions of the feature map."""

  @nn.compact
  def __call__(self, x):  # [B, H, W, C]
    b, hh, ww, c = x.shape
    h = group_norm('norm')(x)
    q, k, v = (nn.Conv(c, (1, 1), name=n)(h).reshape(b, hh * ww, c) for n in 'qkv')
    probs = jax.nn.softmax(jnp.einsum('bic,bjc->bij', q, k) * c ** -0.5, axis=-1)
    y = jnp.einsum('bij,bjc->bic', probs, v).reshape(b, hh, ww, c)
    return x + nn.Conv(c, (1, 1), name='proj_out')(y)


class Downsample(nn.Module):
  @nn.compact
  def __call__(self, x):  # torch pads (0, 1, 0, 1): right and bottom only, then stride 2
    return nn.Conv(x.shape[-1], (3, 3), strides=2, padding=((0, 1), (0, 1)), name='conv')(x)


class Upsample(nn.Module):
  @nn.compact
  def __call__(self, x):  # nearest-neighbour 2x, then a conv
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), padding=PAD_SAME, name='conv')(x)


class Level(nn.Module):
  """One resolution: residual blocks (each followed by attention when `attn`), then a resample."""
  channels: int
  num_res_blocks: int
  attn: bool
  resample: type = None  # Downsample, Upsample or None

  @nn.compact
  def __call__(self, x):
    for j in range(self.num_res_blocks):
      x = ResnetBlock(self.channels, name=f'res_{j}')(x)
      if self.attn:
        x = AttnBlock(name=f'attn_{j}')(x)
    return x if self.resample is None else self.resample(name=self.resample.__name__.lower())(x)


def middle(x, channels):
  x = ResnetBlock(channels, name='mid_0')(x)
  x = AttnBlock(name='mid_1')(x)
  return ResnetBlock(channels, name='mid_2')(x)


class Encoder(nn.Module):
  channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int

  @nn.compact
  def __call__(self, x):  # [B, H, W, 3] -> [B, H/f, W/f, z_channels]
    x = nn.Conv(self.channels, (3, 3), padding=PAD_SAME, name='conv_in')(x)
    last = len(self.channel_mult) - 1
    for i, mult in enumerate(self.channel_mult):
      x = Level(self.channels * mult, self.num_res_blocks, attn=i == last,
                resample=None if i == last else Downsample, name=f'conv_blocks_{i}')(x)
    x = middle(x, x.shape[-1])
    x = nn.swish(group_norm('norm_out')(x))
    return nn.Conv(self.z_channels, (3, 3), padding=PAD_SAME, name='conv_out')(x)


class Decoder(nn.Module):
  """conv_blocks_0 is the lowest resolution (LlamaGen builds them in reversed order)."""
  channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  image_channels: int

  @nn.compact
  def __call__(self, z):  # [B, h, w, z_channels] -> [B, h*f, w*f, image_channels]
    mults = list(reversed(self.channel_mult))
    x = nn.Conv(self.channels * mults[0], (3, 3), padding=PAD_SAME, name='conv_in')(z)
    x = middle(x, x.shape[-1])
    for i, mult in enumerate(mults):
      x = Level(self.channels * mult, self.num_res_blocks + 1, attn=i == 0,
                resample=None if i == len(mults) - 1 else Upsample, name=f'conv_blocks_{i}')(x)
    x = nn.swish(group_norm('norm_out')(x))
    return nn.Conv(self.image_channels, (3, 3), padding=PAD_SAME, name='conv_out')(x)


class VQ16Tokenizer(nn.Module):
  """images [B, H, W, 3] in [-1, 1] <-> tokens [B, H/16, W/16] int32 (the defaults are
  LlamaGen's VQ-16; tests use tiny ones)."""
  codebook_size: int = 16384
  code_dim: int = 8
  channels: int = 128
  channel_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2  # the decoder has one more per level
  z_channels: int = 256
  image_channels: int = 3

  @property
  def factor(self):
    return 2 ** (len(self.channel_mult) - 1)

  def setup(self):
    mult = tuple(self.channel_mult)
    self.encoder = Encoder(self.channels, mult, self.num_res_blocks, self.z_channels)
    self.decoder = Decoder(self.channels, mult, self.num_res_blocks, self.image_channels)
    self.quant_conv = nn.Conv(self.code_dim, (1, 1))
    self.post_quant_conv = nn.Conv(self.z_channels, (1, 1))
    self.codebook = self.param('codebook', nn.initializers.normal(1.0),
                               (self.codebook_size, self.code_dim))

  def codes(self):  # [K, code_dim], unit norm
    return l2_normalize(self.codebook)

  def latents(self, images):  # [B, h, w, code_dim], unit norm
    return l2_normalize(self.quant_conv(self.encoder(images)))

  def lookup(self, z):  # z [B, h, w, d] -> tokens [B, h, w]
    codes = self.codes()
    # LlamaGen's squared distance, term for term, so near-ties break the same way.
    d = (jnp.sum(z * z, -1, keepdims=True) + jnp.sum(codes * codes, -1)
         - 2.0 * jnp.einsum('bhwd,kd->bhwk', z, codes))
    return jnp.argmin(d, axis=-1).astype(jnp.int32)

  def encode(self, images):
    return self.lookup(self.latents(images))

  def decode(self, tokens):  # [B, h, w] -> [B, h*f, w*f, 3], roughly in [-1, 1]
    return self.decoder(self.post_quant_conv(self.codes()[tokens]))

  def __call__(self, images):
    """Reconstruction (builds every parameter); returns (recon, {'tokens': ...})."""
    tokens = self.encode(images)
    return self.decode(tokens), {'tokens': tokens}
