"""Input pipeline: deterministic, resumable, per-process numpy batches from a tfds source.

The batch for global step s is a pure function of (seed, s): epoch e = s // steps_per_epoch
uses the permutation seeded by (seed, e). Resuming at step s therefore needs no iterator
state, and process p of P reads only its 1/P slice of each global batch.
"""

import os
import queue
import threading

import jax
import numpy as np
import tensorflow_datasets as tfds

from ssd_jax.data import fashion_mnist

LOCAL_BUILDERS = {'fashion_mnist_local': fashion_mnist.FashionMnistLocal}


def default_data_dir(data_dir=None):
  return data_dir or os.environ.get('TFDS_DATA_DIR') or os.path.expanduser(
      '~/tensorflow_datasets')


def prepare_local(name, data_dir, idx_dir=None):
  """Builds one of our local-file datasets into `data_dir` if it is not there yet."""
  builder = LOCAL_BUILDERS[name](
      data_dir=data_dir, idx_dir=idx_dir, file_format='array_record')
  if not os.path.isdir(builder.data_dir) or not os.listdir(builder.data_dir):
    # Fail before tfds creates folders, with the message that says how to get the files.
    fashion_mnist.read_split(builder._idx_dir, 'test')
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def data_source(data_config, split):
  """A random-access source of {'image': [h, w, c] uint8, 'label': int} examples."""
  data_dir = default_data_dir(data_config.data_dir)
  if data_config.name in LOCAL_BUILDERS:
    prepare_local(data_config.name, data_dir, data_config.idx_dir)
  try:
    return tfds.data_source(data_config.name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # tfds raises several types for "not prepared"; all mean the same.
    raise FileNotFoundError(
        f'tfds dataset {data_config.name!r} (split {split!r}) is not prepared in '
        f'{data_dir}: {e}. Prepare it once with tfds on a machine with its source files '
        f'(array_record format), or use --config.data.name=fashion_mnist_local.') from e


def _stack(examples):
  """{'image': [B, H, W, C] uint8 | 'tokens': [B, H, W] int32, 'label': [B] int32}."""
  labels = np.asarray([int(ex['label']) for ex in examples], np.int32)
  if 'tokens' in examples[0]:  # a cached token split (ssd_jax/data/tokens.py)
    return {'tokens': np.stack([ex['tokens'] for ex in examples]).astype(np.int32),
            'label': labels}
  images = np.stack([np.asarray(ex['image']) for ex in examples]).astype(np.uint8)
  if images.ndim == 3:  # [B, H, W] -> [B, H, W, 1]
    images = images[..., None]
  return {'image': images, 'label': labels}


def load_arrays(data_config, split, limit=None):
  """The first `limit` examples of a split as arrays (for evaluation)."""
  source = data_source(data_config, split)
  n = len(source) if limit is None else min(limit, len(source))
  return _stack(source.__getitems__(list(range(n))))


class Batches:
  """Shuffled batches of one process's share of a global batch, from any start step."""

  def __init__(self, source, global_batch_size, seed, start_step=0, prefetch=2,
               process_index=None, process_count=None):
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % self.process_count:
      raise ValueError(
          f'batch_size={global_batch_size} is not divisible by the {self.process_count} '
          f'processes; use a multiple of {self.process_count}.')
    if global_batch_size > len(source):
      raise ValueError(f'batch_size={global_batch_size} exceeds the {len(source)} '
                       'examples of the split.')
    self.source = source
    self.global_batch_size = global_batch_size
    self.local_batch_size = global_batch_size // self.process_count
    self.seed = seed
    self.steps_per_epoch = len(source) // global_batch_size
    self.step = start_step
    self._prefetch = prefetch
    self._queue = None

  def indices(self, step):
    """Indices into the source of this process's examples at global step `step`."""
    epoch, offset = divmod(step, self.steps_per_epoch)
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.source))
    start = offset * self.global_batch_size + self.process_index * self.local_batch_size
    return perm[start:start + self.local_batch_size]

  def batch_at(self, step):
    return _stack(self.source.__getitems__(self.indices(step).tolist()))

  def _fill(self, start):
    step = start
    while True:
      self._queue.put(self.batch_at(step))
      step += 1

  def __iter__(self):
    return self

  def __next__(self):
    if self._prefetch <= 0:
      batch = self.batch_at(self.step)
    else:
      if self._queue is None:  # A daemon thread reads ahead while the device computes.
        self._queue = queue.Queue(maxsize=self._prefetch)
        threading.Thread(target=self._fill, args=(self.step,), daemon=True).start()
      batch = self._queue.get()
    self.step += 1
    return batch
