"""Fashion-MNIST as a tensorflow-datasets builder, read from local IDX files.

tfds ships its own `fashion_mnist` builder, but it downloads. This one reads the IDX files
of Debian's `dataset-fashion-mnist` package (or any folder holding the same four files), so
no code path touches the network, and writes array_record shards so that
`tfds.data_source('fashion_mnist_local', ...)` serves it without TensorFlow.
"""

import gzip
import os

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_IDX_DIR = '/usr/share/datasets/fashion-mnist'
IDX_DIR_ENV = 'SSD_JAX_FASHION_MNIST_DIR'
CLASS_NAMES = ('t-shirt', 'trouser', 'pullover', 'dress', 'coat', 'sandal', 'shirt',
               'sneaker', 'bag', 'ankle-boot')
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
INSTALL_HINT = (
    'Fashion-MNIST IDX files not found in {dir}. Install them with '
    '`apt-get install dataset-fashion-mnist` (Debian, puts them in ' + DEFAULT_IDX_DIR +
    '), or put train-/t10k-images-idx3-ubyte[.gz] and train-/t10k-labels-idx1-ubyte[.gz] '
    'in a folder and pass it as --config.data.idx_dir=DIR (or set $' + IDX_DIR_ENV + ').')


def idx_dir_or_default(idx_dir=None):
  return idx_dir or os.environ.get(IDX_DIR_ENV) or DEFAULT_IDX_DIR


def _find(idx_dir, stem):
  for name in (stem, stem + '.gz'):
    path = os.path.join(idx_dir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(INSTALL_HINT.format(dir=idx_dir))


def read_idx(path):
  """Reads one IDX file (optionally gzipped) into a numpy array."""
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rb') as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
    raise ValueError(f'{path} is not an unsigned-byte IDX file (bad magic number).')
  ndim = data[3]
  shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
  body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
  if body.size != int(np.prod(shape)):
    raise ValueError(f'{path} is truncated: header says {shape}, found {body.size} bytes.')
  return body.reshape(shape)


def read_split(idx_dir, split):
  """Returns (images [N, 28, 28] uint8, labels [N] uint8) of one split."""
  images_stem, labels_stem = _FILES[split]
  images = read_idx(_find(idx_dir, images_stem))
  labels = read_idx(_find(idx_dir, labels_stem))
  if len(images) != len(labels):
    raise ValueError(f'{idx_dir}: {split} has {len(images)} images but {len(labels)} labels.')
  return images, labels


class FashionMnistLocal(tfds.core.GeneratorBasedBuilder):
  """Fashion-MNIST (Zalando, MIT licence) from local IDX files; no download."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Read from Debian dataset-fashion-mnist IDX files.'}

  def __init__(self, *, idx_dir=None, **kwargs):
    self._idx_dir = idx_dir_or_default(idx_dir)
    super().__init__(**kwargs)

  def _info(self):
    # A plain uint8 tensor: tfds' Image feature needs TensorFlow to encode PNGs.
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(names=CLASS_NAMES),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://github.com/zalandoresearch/fashion-mnist',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split) for split in _FILES}

  def _generate_examples(self, split):
    images, labels = read_split(self._idx_dir, split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image[:, :, None], 'label': int(label)}
