"""Decoder-only transformer over raster-ordered token grids, with a static-length KV cache.

Sequence layout: slots [0, P) hold the condition prefix (P embeddings; a class embedding
now, a text encoder's output later), slot P + i holds image token i. The hidden state at
slot P + i - 1 predicts token i, so `hidden[:, i]` below always means "the state that
predicts token i" (for the heads: h(y, x) with i = y * W + x).

One call, `decode(tokens [B,T], slots [B,T], cache)`, writes a block of T tokens at
per-sample slots and attends to the committed slots [0, cache.length) plus the block
(causal inside the block unless a block mask, e.g. a draft tree, says otherwise). Plain
decoding is T = 1, verifying k drafts is T = k + 1. Slots beyond `length` are masked
explicitly; rejected drafts are dropped by moving `length` back.

Attention reads the cache only up to the last slot any query of the batch may see, rounded
up to one of `kv_buckets` static lengths (a `lax.switch` over them), so a pass early in the
grid reads a fraction of the static cache instead of all of it.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ssd_jax.models import layers


@flax.struct.dataclass
class KVCache:
  k: jax.Array       # [L, B, H, S, Dh] keys, S static
  v: jax.Array       # [L, B, H, S, Dh] values
  length: jax.Array  # [B] int32: slots [0, length) hold committed entries

  @classmethod
  def create(cls, num_layers, batch, max_len, num_heads, head_dim, dtype=jnp.float32):
    shape = (num_layers, batch, num_heads, max_len, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
               length=jnp.zeros((batch,), jnp.int32))

  @property
  def max_len(self):
    return self.k.shape[3]

  def commit(self, length):
    return self.replace(length=jnp.asarray(length, jnp.int32))


def kv_bucket_sizes(max_len, buckets):
  """Static key lengths (ascending, the last = max_len) attention may read up to; sizes
  are multiples of 8 so that each branch's arrays stay aligned."""
  buckets = max(1, min(buckets, max_len // 8))
  ceil = lambda a, b: -(-a // b)
  sizes = [min(max_len, 8 * ceil(ceil(max_len * (i + 1), buckets), 8)) for i in range(buckets)]
  return tuple(dict.fromkeys(sizes[:-1] + [max_len]))


def kv_bucket(mask, sizes):
  """mask [B, T, S] -> [] int32: the smallest bucket holding every slot any query sees."""
  used = jnp.max(jnp.where(mask, jnp.arange(1, mask.shape[-1] + 1), 0))
  return jnp.searchsorted(jnp.asarray(sizes[:-1]), used, side='left').astype(jnp.int32)


def attend(q, k, v, mask, head_dim):
  """q [B, T, H, Dh], k, v [B, H, S, Dh], mask [B, T, S] -> [B, T, H * Dh]."""
  b, t = q.shape[:2]
  # Scores and softmax in float32 also when activations are bfloat16.
  scores = jnp.einsum('bthd,bhsd->bhts', q, k, preferred_element_type=jnp.float32)
  scores = scores / jnp.sqrt(jnp.float32(head_dim))
  scores = jnp.where(mask[:, None], scores, jnp.finfo(scores.dtype).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhts,bhsd->bthd', probs, v).reshape(b, t, -1)


def cache_mask(slots, length, max_len, block_mask=None):
  """[B, T, S] bool: query t sees committed slots and the block slots block_mask allows."""
  t = slots.shape[1]
  if block_mask is None:
    block_mask = jnp.tril(jnp.ones((t, t), bool))
  block_mask = jnp.broadcast_to(block_mask, (slots.shape[0], t, t))
  committed = jnp.arange(max_len)[None, None, :] < length[:, None, None]  # [B, 1, S]
  onehot = jax.nn.one_hot(slots, max_len, dtype=jnp.float32)              # [B, T, S]
  in_block = jnp.einsum('btu,bus->bts', block_mask.astype(jnp.float32), onehot) > 0
  return committed | in_block


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  rope_interleaved: bool = False  # rotate adjacent pairs (LlamaGen) instead of halves

  @nn.compact
  def __call__(self, x, angles, mask, cache=None, layer=None, slots=None, rope_keep=None,
               kv=None):
    """x [B, T, D]; mask [B, T, S] (S = T without cache); rope_keep [B, T] (False: q = k = 0,
    see layers.apply_rope); kv (bucket [], sizes): with the cache, read keys up to
    sizes[bucket] only (see kv_bucket); returns (y, cache)."""
    b, t, _ = x.shape
    qkv = layers.Dense(3 * self.num_heads * self.head_dim, ('embed', 'heads'), name='qkv')(x)
    q, k, v = jnp.split(qkv.reshape(b, t, 3 * self.num_heads, self.head_dim), 3, axis=2)
    q = layers.apply_rope(q, angles, self.rope_interleaved, rope_keep)  # [B, T, H, Dh]
    k = layers.apply_rope(k, angles, self.rope_interleaved, rope_keep)
    if cache is not None:
      bidx = jnp.arange(b)[:, None]
      # Heads before slots: attention reads each head's keys as one contiguous [S, Dh].
      cache = cache.replace(
          k=cache.k.at[layer, bidx, :, slots].set(k.astype(cache.k.dtype)),
          v=cache.v.at[layer, bidx, :, slots].set(v.astype(cache.v.dtype)))
      if kv is None or len(kv[1]) == 1:
        y = attend(q, cache.k[layer], cache.v[layer], mask, self.head_dim)
      else:
        # The whole cache goes into the switch and each branch slices its layer and length,
        # so no branch copies more of it than it reads.
        def upto(size):
          return lambda q, ck, cv, mask: attend(q, ck[layer, :, :, :size], cv[layer, :, :, :size],
                                                mask[..., :size], self.head_dim)
        y = jax.lax.switch(kv[0], [upto(size) for size in kv[1]], q, cache.k, cache.v, mask)
    else:
      y = attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, self.head_dim)
    return layers.Dense(x.shape[-1], ('heads', 'embed'), name='out')(y), cache


class Block(nn.Module):
  num_heads: int
  head_dim: int
  mlp_dim: int
  norm_eps: float = 1e-6
  rope_interleaved: bool = False

  @nn.compact
  def __call__(self, x, angles, mask, cache=None, layer=None, slots=None, rope_keep=None,
               kv=None):
    x = nn.with_logical_constraint(x, ('act_batch', 'act_len', 'act_embed'))
    y, cache = Attention(self.num_heads, self.head_dim, self.rope_interleaved, name='attn')(
        layers.RMSNorm(self.norm_eps, name='attn_norm')(x), angles, mask, cache, layer, slots,
        rope_keep, kv)
    x = x + y
    x = x + layers.SwiGLU(self.mlp_dim, name='mlp')(
        layers.RMSNorm(self.norm_eps, name='mlp_norm')(x))
    return x, cache


class Transformer(nn.Module):
  """Class-conditional AR model over [H, W] grids of `vocab_size` tokens.

  The defaults are our own model; LlamaGen's c2i GPTs (ssd_jax/importers/llamagen.py) set
  rope_base=10000, norm_eps=1e-5, rope_interleaved and rope_zero_prefix.
  """
  vocab_size: int
  num_classes: int
  grid: tuple  # (H, W)
  num_layers: int = 4
  dim: int = 192
  num_heads: int = 6
  mlp_dim: int = 512
  prefix_len: int = 1
  rope_base: float = 100.0
  label_dropout: float = 0.1
  norm_eps: float = 1e-6
  rope_interleaved: bool = False  # rotate adjacent pairs (x[2j], x[2j+1]) instead of halves
  rope_zero_prefix: bool = False  # prefix slots get cos = sin = 0 (q = k = 0), not -1, -2, ...
  # Decoding only: attention reads the cache up to the smallest of this many static lengths
  # that holds every visible slot (1 = the whole cache every pass). Not a weight: any value
  # loads any checkpoint.
  kv_buckets: int = 4

  @property
  def head_dim(self):
    return self.dim // self.num_heads

  @property
  def num_tokens(self):
    return self.grid[0] * self.grid[1]

  @property
  def null_class(self):
    return self.num_classes  # the learned "no condition" embedding, for CFG

  def setup(self):
    init = nn.with_logical_partitioning(layers.DEFAULT_INIT, ('vocab', 'embed'))
    self.token_embed = nn.Embed(self.vocab_size, self.dim, embedding_init=init)
    self.class_embed = nn.Embed(
        self.num_classes + 1, self.prefix_len * self.dim,
        embedding_init=nn.with_logical_partitioning(layers.DEFAULT_INIT, ('classes', 'embed')))
    self.blocks = [Block(self.num_heads, self.head_dim, self.mlp_dim, self.norm_eps,
                         self.rope_interleaved, name=f'block_{i}')
                   for i in range(self.num_layers)]
    self.final_norm = layers.RMSNorm(self.norm_eps)
    self.lm_head = layers.Dense(self.vocab_size, ('embed', 'vocab'))

  # --- pieces other modules (heads, decoding) use -------------------------------------
  def condition(self, labels):
    """labels [B] in [0, num_classes] (num_classes = null) -> prefix [B, P, D]."""
    return self.class_embed(labels).reshape(labels.shape[0], self.prefix_len, self.dim)

  def embed_tokens(self, tokens):
    return self.token_embed(tokens)

  def logits_from_hidden(self, hidden):
    return self.lm_head(self.final_norm(hidden))

  def slot_rows_cols(self, slots):
    """2D positions of sequence slots: prefix slots get their own (negative) positions."""
    i = slots - self.prefix_len
    width = self.grid[1]
    prefix = i < 0
    return jnp.where(prefix, i, i // width), jnp.where(prefix, i, i % width)

  def _body(self, x, slots, mask, cache=None, rope_pos=None):
    rows, cols = self.slot_rows_cols(slots) if rope_pos is None else rope_pos
    angles = layers.rope_angles(rows, cols, self.head_dim, self.rope_base)
    # Prefix slots are the ones with negative positions (rope_pos holds image positions).
    keep = rows >= 0 if self.rope_zero_prefix else None
    kv = None
    if cache is not None:
      sizes = kv_bucket_sizes(cache.max_len, self.kv_buckets)
      kv = (kv_bucket(mask, sizes), sizes)  # one bucket for all layers of this pass
    for i, block in enumerate(self.blocks):
      x, cache = block(x, angles, mask, cache, i, slots, keep, kv)
    return x, cache

  # --- training: the whole grid in one causal pass --------------------------------------
  def __call__(self, tokens, labels=None, cond=None, train=False):
    """tokens [B, N] -> (logits [B, N, V], hidden [B, N, D]); hidden[:, i] predicts token i.

    Pass class `labels` [B] or a precomputed condition prefix `cond` [B, P, D]. With
    train=True labels are replaced by the null class with prob label_dropout (CFG).
    """
    if cond is None:
      if train and self.label_dropout > 0:
        drop = jax.random.bernoulli(self.make_rng('dropout'), self.label_dropout,
                                    labels.shape)
        labels = jnp.where(drop, self.null_class, labels)
      cond = self.condition(labels)
    x = jnp.concatenate([cond, self.embed_tokens(tokens[:, :-1])], axis=1)  # [B, P+N-1, D]
    b, s = x.shape[:2]
    slots = jnp.broadcast_to(jnp.arange(s), (b, s))
    mask = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (b, s, s))
    h, _ = self._body(x, slots, mask)
    hidden = h[:, self.prefix_len - 1:]  # [B, N, D]
    return self.logits_from_hidden(hidden), hidden

  # --- decoding with the cache ----------------------------------------------------------
  def step(self, x, slots, cache, block_mask=None, rope_pos=None, visible=None):
    """x [B, T, D] written at slots [B, T] -> (logits [B, T, V], hidden [B, T, D], cache).

    `visible` [B, T, S] replaces the default mask (committed prefix + block_mask) for
    schedules whose committed tokens are not a prefix (ZipAR's rows). Leaves cache.length
    alone: the caller commits what it accepted.
    """
    mask = visible if visible is not None else cache_mask(slots, cache.length, cache.max_len,
                                                          block_mask)
    h, cache = self._body(x, slots, mask, cache, rope_pos)
    return self.logits_from_hidden(h), h, cache

  def prefill(self, cond, cache):
    """cond [B, P, D] -> (logits, hidden) of the last prefix slot [B, 1, ...] (token 0)."""
    b = cond.shape[0]
    slots = jnp.broadcast_to(jnp.arange(self.prefix_len), (b, self.prefix_len))
    logits, h, cache = self.step(cond, slots, cache)
    return logits[:, -1:], h[:, -1:], cache

  def decode(self, tokens, slots, cache, block_mask=None, rope_pos=None, visible=None):
    return self.step(self.embed_tokens(tokens), slots, cache, block_mask, rope_pos, visible)

  def init_cache(self, batch, extra_slots=0, dtype=jnp.float32):
    """An empty cache for prefix + all tokens (+ room for blocks running past the end)."""
    return KVCache.create(self.num_layers, batch, self.prefix_len + self.num_tokens
                          + extra_slots, self.num_heads, self.head_dim, dtype)
