"""MuLo-SD's low-resolution side: pooled target tokens and the learned upsampler.

Low-resolution grids are POOLED TOKENS OF THE TARGET'S OWN TOKENIZER, not a second
tokenizer at a larger factor: each f x f block of a 14x14 grid becomes the code nearest
(cosine, the tokenizer's own lookup) to the mean of the block's codes, a 7x7 grid for
f = 2. Why: no second tokenizer to train (XLA's CPU convolutions are this project's
bottleneck), the low-resolution grid is a deterministic function of the data grid (both
stages train on the same grids the target does), and drafter, upsampler and target share
one vocabulary and latent space. What it costs: a pooled code is a blend of four patches,
so the upsampler has to guess the detail a factor-4 tokenizer would have learned to keep.

The drafter is a plain `transformer.Transformer` over the low-resolution grid; the
upsampler below maps a whole low-resolution grid to a distribution over the target's
tokens at every fine position at once (independent per position: the draft is its mode).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssd_jax.models import layers
from ssd_jax.models import transformer


def pool_tokens(tokens, codes, factor):
  """tokens [B, H, W] -> [B, H/f, W/f] int32; codes [V, d] unit-norm."""
  b, h, w = tokens.shape
  z = codes[tokens].reshape(b, h // factor, factor, w // factor, factor, codes.shape[-1])
  mean = jnp.mean(z, axis=(2, 4))                                  # [B, h, w, d]
  return jnp.argmax(mean @ codes.T, axis=-1).astype(jnp.int32)     # cosine: codes unit


class Upsampler(nn.Module):
  """Class-conditional, non-causal: low-res tokens [B, h*w] -> logits [B, H*W, V].

  Non-causal blocks with axial 2D RoPE run on the coarse grid (every coarse cell sees the
  whole coarse grid and the class); a depth-to-space head then emits the f x f fine
  tokens of each cell from its state, as the tokenizer's decoder does with pixels. Running
  on h*w rather than H*W positions makes it ~4x cheaper than a fine-grid transformer.
  The class is a prefix token; label dropout gives a null class so CFG can guide the
  upsampler like the other models.
  """
  vocab_size: int
  num_classes: int
  grid: tuple  # (H, W) of the target
  factor: int = 2
  num_layers: int = 2
  dim: int = 128
  num_heads: int = 4
  mlp_dim: int = 256
  rope_base: float = 100.0
  label_dropout: float = 0.1

  @property
  def low_grid(self):
    return (self.grid[0] // self.factor, self.grid[1] // self.factor)

  @property
  def null_class(self):
    return self.num_classes

  @nn.compact
  def __call__(self, low_tokens, labels, train=False):
    if train and self.label_dropout > 0:
      drop = jax.random.bernoulli(self.make_rng('dropout'), self.label_dropout, labels.shape)
      labels = jnp.where(drop, self.null_class, labels)
    b = low_tokens.shape[0]
    (h, w), f, v = self.low_grid, self.factor, self.vocab_size
    init = lambda axes: nn.with_logical_partitioning(layers.DEFAULT_INIT, axes)
    x = nn.Embed(v, self.dim, embedding_init=init(('vocab', 'embed')),
                 name='low_embed')(low_tokens)                       # [B, h*w, D]
    cond = nn.Embed(self.num_classes + 1, self.dim, embedding_init=init(('classes', 'embed')),
                    name='class_embed')(labels)[:, None]
    x = jnp.concatenate([cond, x], axis=1)                          # [B, 1 + h*w, D]
    rows, cols = jnp.divmod(jnp.arange(h * w), w)
    pos = lambda p: jnp.broadcast_to(jnp.concatenate([jnp.array([-1]), p]), (b, 1 + h * w))
    head_dim = self.dim // self.num_heads
    angles = layers.rope_angles(pos(rows), pos(cols), head_dim, self.rope_base)
    mask = jnp.ones((b, 1 + h * w, 1 + h * w), bool)                # non-causal
    for i in range(self.num_layers):
      x, _ = transformer.Block(self.num_heads, head_dim, self.mlp_dim, name=f'block_{i}')(
          x, angles, mask)
    x = layers.RMSNorm(name='final_norm')(x[:, 1:])
    logits = layers.Dense(f * f * v, ('embed', 'vocab'), name='lm_head')(x)
    logits = logits.reshape(b, h, w, f, f, v).transpose(0, 1, 3, 2, 4, 5)  # depth to space
    return logits.reshape(b, h * f * w * f, v)


def upsampler_module(spec):
  """model.json's {'upsampler': {...}} -> Upsampler (what pretrained.MODULES calls)."""
  kw = dict(spec['upsampler'])
  kw['grid'] = tuple(kw['grid'])
  return Upsampler(**kw)


def upsampler_init_args(module):
  """Dummy (low-res tokens, labels) that make `module.init` build every parameter."""
  h, w = module.low_grid
  return jnp.zeros((1, h * w), jnp.int32), jnp.zeros((1,), jnp.int32)
