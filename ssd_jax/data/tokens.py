"""Token grids cached on disk: a tfds image split tokenized once by a frozen tokenizer.

As LlamaGen pre-tokenizes ImageNet before training its GPTs, stages that only need token
grids (heads, hawk_draft on an imported model) can read them from a cache instead of
running the tokenizer's encoder every step (the VQ-16 encoder at 256x256 costs far more
than the heads). Images are resized and centre-cropped to the tokenizer's input size the
way LlamaGen's `center_crop_arr` does (ADM's: halve with a box filter while the short side
is at least twice the target, then bicubic to the target, then crop the middle).

Layout of one cached split, <tokens_dir>/<dataset>/<split>/:
  meta.json           what made it: dataset, split, image size, grid, tokenizer fingerprint
  tokens-00012.npy    [n, H, W] int32, the examples 12 * chunk_size ... of the split
  labels-00012.npy    [n] int32
A chunk is written under a temporary name and renamed, so an interrupted run resumes at
the first missing chunk. With several processes, process p tokenizes chunks p, p + P, ...
into the same folder, which must be on a filesystem they all see.
"""

import concurrent.futures
import hashlib
import json
import os
import re
import time

import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image

from ssd_jax.data import pipeline
from ssd_jax.models import vq

PREPROCESS = 'center_crop_adm'  # LlamaGen's center_crop_arr; a change here must change this


def center_crop(image, height, width):
  """uint8 [h, w, c] (or [h, w]) -> uint8 [height, width, c], LlamaGen's centre crop."""
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.shape[:2] == (height, width):
    return image if image.ndim == 3 else image[..., None]
  pil = Image.fromarray(image)
  while pil.size[0] >= 2 * width and pil.size[1] >= 2 * height:
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
  scale = max(width / pil.size[0], height / pil.size[1])
  pil = pil.resize((max(width, round(pil.size[0] * scale)),
                    max(height, round(pil.size[1] * scale))), resample=Image.BICUBIC)
  out = np.asarray(pil)
  top, left = (out.shape[0] - height) // 2, (out.shape[1] - width) // 2
  out = out[top:top + height, left:left + width]
  return out if out.ndim == 3 else out[..., None]


def to_channels(image, channels):
  """uint8 [h, w, c] -> [h, w, channels]: grey repeated to RGB, RGB to luminance."""
  if image.shape[-1] == channels:
    return image
  if image.shape[-1] == 1:
    return np.repeat(image, channels, -1)
  if channels == 1:
    return np.asarray(Image.fromarray(image[..., :3]).convert('L'))[..., None]
  return image[..., :channels]


def fingerprint(tokenizer_spec, tok_params):
  """sha256 of the tokenizer's model.json entry and its parameters' bytes."""
  h = hashlib.sha256(json.dumps(tokenizer_spec, sort_keys=True).encode())
  for path, leaf in jax.tree_util.tree_leaves_with_path(tok_params):
    leaf = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode() + str(leaf.dtype).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  return h.hexdigest()[:16]


class TokenSource:
  """Random access to the first `num_examples` of a cached split, like a tfds data source:
  {'tokens': [H, W] int32, 'label': int} examples (pipeline.Batches reads it)."""

  def __init__(self, directory, num_examples, chunk_size):
    self.directory = directory
    self.chunk_size = chunk_size
    self.num_examples = num_examples
    chunks = -(-num_examples // chunk_size)
    self.tokens = [np.load(chunk_path(directory, 'tokens', c), mmap_mode='r')
                   for c in range(chunks)]
    self.labels = np.concatenate([np.load(chunk_path(directory, 'labels', c))
                                  for c in range(chunks)])[:num_examples]

  def __len__(self):
    return self.num_examples

  def __getitem__(self, i):
    chunk, offset = divmod(int(i), self.chunk_size)
    return {'tokens': np.asarray(self.tokens[chunk][offset]), 'label': int(self.labels[i])}

  def __getitems__(self, indices):
    return [self[i] for i in indices]

  def arrays(self):
    """{'tokens': [N, H, W] int32, 'label': [N] int32} of the whole (limited) split."""
    tokens = np.concatenate([np.asarray(t) for t in self.tokens])[:self.num_examples]
    return {'tokens': tokens, 'label': self.labels.copy()}


def chunk_path(directory, kind, chunk):
  return os.path.join(directory, f'{kind}-{chunk:05d}.npy')


def read_meta(directory, want, what, flag):
  """The meta.json of a chunked folder (None where there is none yet); a folder made with
  other settings than `want` is refused, naming them and the `flag` that picks another."""
  meta_path = os.path.join(directory, 'meta.json')
  if not os.path.exists(meta_path):
    return None
  with open(meta_path) as f:
    have = json.load(f)
  differ = [k for k in want if have.get(k) != want[k]]
  if differ:
    raise ValueError(
        f'{directory} holds {what} made with other settings ('
        + ', '.join(f'{k}: {have.get(k)} there, {want[k]} here' for k in differ)
        + f'); point {flag} at another folder, or delete that one.')
  return have


def save_atomic(path, array):
  tmp = path + f'.tmp{jax.process_index()}.npy'
  np.save(tmp, array)
  os.replace(tmp, path)


class TokenCache:
  """Tokenizes tfds splits of `data_config` with a frozen tokenizer into `tokens_dir`, once.

  `image_size` is (height, width) of the tokenizer's input, `grid` its output (the
  backbone's grid). A cached split made by another tokenizer, image size or preprocessing
  is refused, never mixed or overwritten.
  """

  def __init__(self, data_config, tokens_dir, tokenizer, tok_params, tokenizer_spec,
               grid, batch_size=64, chunk_size=4096, log=print):
    self.data_config = data_config
    self.tokens_dir = tokens_dir
    self.tokenizer = tokenizer
    self.tok_params = tok_params
    self.grid = tuple(grid)
    self.image_size = tuple(g * tokenizer.factor for g in self.grid)
    self.channels = tokenizer.image_channels
    self.batch_size = batch_size
    self.chunk_size = chunk_size
    self.log = log
    self._tokenizer_spec = tokenizer_spec
    self._fingerprint = None
    self._encode = None

  def split_dir(self, split):  # a tfds slice such as 'train[:1%]' is no folder name
    return os.path.join(self.tokens_dir, self.data_config.name, re.sub(r'[^\w.-]', '_', split))

  def meta(self):
    if self._fingerprint is None:
      self._fingerprint = fingerprint(self._tokenizer_spec, self.tok_params)
    return {'dataset': self.data_config.name, 'image_size': list(self.image_size),
            'grid': list(self.grid), 'channels': self.channels, 'preprocess': PREPROCESS,
            'tokenizer': self._fingerprint, 'chunk_size': self.chunk_size}

  def source(self, split, limit=None):
    """A TokenSource of the first `limit` examples (all if None) of `split`, tokenizing
    what the cache lacks."""
    directory = self.split_dir(split)
    meta_path = os.path.join(directory, 'meta.json')
    want = dict(self.meta(), split=split)
    have = read_meta(directory, want, 'tokens', '--config.data.tokens_dir')
    split_examples = None if have is None else have['split_examples']
    images = None
    if split_examples is None:
      images = pipeline.data_source(self.data_config, split)
      split_examples = len(images)
      if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        tmp = meta_path + '.tmp'
        with open(tmp, 'w') as f:
          json.dump(dict(want, split_examples=split_examples), f, indent=1)
        os.replace(tmp, meta_path)
    n = split_examples if limit is None else min(limit, split_examples)
    chunks = range(-(-n // self.chunk_size))
    missing = [c for c in chunks if not os.path.exists(chunk_path(directory, 'labels', c))]
    if missing:
      if images is None:
        images = pipeline.data_source(self.data_config, split)
      mine = [c for c in missing if c % jax.process_count() == jax.process_index()]
      self._tokenize(images, directory, mine, split_examples, f'{split}: {len(missing)} of '
                     f'{len(chunks)} chunks')
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'tokens {directory}')
    lost = [c for c in chunks if not os.path.exists(chunk_path(directory, 'labels', c))]
    if lost:
      raise FileNotFoundError(
          f'{directory} lacks chunk {lost[0]} after tokenizing: with several processes the '
          'tokens folder must be on a filesystem every process sees (--config.data.tokens_dir).')
    return TokenSource(directory, n, self.chunk_size)

  def _encoder(self):
    if self._encode is None:
      devices = jax.local_devices()
      mesh = jax.sharding.Mesh(np.array(devices), ('data',))
      spec = jax.sharding.PartitionSpec
      replicated = jax.sharding.NamedSharding(mesh, spec())
      params = jax.device_put(self.tok_params, replicated)
      step = -(-self.batch_size // len(devices)) * len(devices)
      tokenizer = self.tokenizer
      fn = jax.jit(lambda p, x: tokenizer.apply({'params': p}, vq.images_to_unit(x),
                                                method=tokenizer.encode),
                   in_shardings=(replicated, jax.sharding.NamedSharding(mesh, spec('data'))))
      self._encode = (lambda x: fn(params, x), step)
    return self._encode

  def _load(self, images, i):
    ex = images[int(i)]
    image = center_crop(ex['image'], *self.image_size)
    return to_channels(image, self.channels), int(ex['label'])

  def _tokenize(self, images, directory, chunks, split_examples, what):
    if not chunks:
      return
    encode, step = self._encoder()
    self.log(f'[tokens] tokenizing {self.data_config.name} {what} into {directory} '
             f'({self.image_size[0]}x{self.image_size[1]} -> {self.grid[0]}x{self.grid[1]}; '
             f'this process: {len(chunks)} chunks of {self.chunk_size})')
    t0, done = time.time(), 0
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for k, c in enumerate(chunks):
        start = c * self.chunk_size
        indices = range(start, min(start + self.chunk_size, split_examples))
        loaded = list(pool.map(lambda i: self._load(images, i), indices))
        batch = np.stack([im for im, _ in loaded])
        labels = np.asarray([lab for _, lab in loaded], np.int32)
        pad = (-len(batch)) % step
        batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], np.uint8)])
        tokens = np.concatenate([np.asarray(encode(batch[j:j + step]))
                                 for j in range(0, len(batch), step)])[:len(labels)]
        save_atomic(chunk_path(directory, 'tokens', c), tokens.astype(np.int32))
        save_atomic(chunk_path(directory, 'labels', c), labels)
        done += len(labels)
        rate = done / max(time.time() - t0, 1e-9)
        left = sum(min(self.chunk_size, split_examples - d * self.chunk_size)
                   for d in chunks[k + 1:])
        self.log(f'[tokens] chunk {k + 1}/{len(chunks)}: {done} images, {rate:.1f} img/s, '
                 f'ETA {left / rate / 60:.1f} min')
