"""Fashion-MNIST tfds builder on tiny IDX files, and the deterministic, resumable pipeline."""

import gzip
import os

import numpy as np
import pytest

from configs import tokenizer as tokenizer_config
from ssd_jax.data import fashion_mnist
from ssd_jax.data import pipeline

NUM_TRAIN, NUM_TEST = 40, 12


def write_idx(path, array, gz=False):
  """One unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian dims, raw bytes."""
  header = bytes([0, 0, 8, array.ndim]) + b''.join(d.to_bytes(4, 'big') for d in array.shape)
  with (gzip.open if gz else open)(str(path) + ('.gz' if gz else ''), 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_idx(idx_dir, gz=False):
  """Train and test IDX files; image i of a split is filled with the value i (its id)."""
  os.makedirs(idx_dir, exist_ok=True)
  arrays = {}
  for split, prefix, n in (('train', 'train', NUM_TRAIN), ('test', 't10k', NUM_TEST)):
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None], (n, 28, 28))
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    write_idx(os.path.join(idx_dir, f'{prefix}-images-idx3-ubyte'), images, gz)
    write_idx(os.path.join(idx_dir, f'{prefix}-labels-idx1-ubyte'), labels, gz)
    arrays[split] = (images, labels)
  return arrays


def data_config(tmp_path, idx_dir):
  config = tokenizer_config.get_config('smoke').data
  config.idx_dir = str(idx_dir)
  config.data_dir = str(tmp_path / 'tfds')
  return config


def ids(batch):
  return batch['image'][:, 0, 0, 0].astype(int)


@pytest.fixture(scope='module')
def source(tmp_path_factory):
  tmp_path = tmp_path_factory.mktemp('data')
  write_fashion_idx(tmp_path / 'idx')
  return pipeline.data_source(data_config(tmp_path, tmp_path / 'idx'), 'train')


@pytest.mark.parametrize('gz', [False, True])
def test_builder_prepares_and_serves_idx_files(tmp_path, gz):
  arrays = write_fashion_idx(tmp_path / 'idx', gz=gz)
  config = data_config(tmp_path, tmp_path / 'idx')
  for split in ('train', 'test'):
    source = pipeline.data_source(config, split)  # prepares on first use
    images, labels = arrays[split]
    assert len(source) == len(labels)
    # tfds stores examples in its own (keyed, shuffled) order: match them up by id.
    served = pipeline.load_arrays(config, split)
    assert served['image'].shape == (len(labels), 28, 28, 1)
    assert served['image'].dtype == np.uint8 and served['label'].dtype == np.int32
    order = ids(served)
    assert sorted(order.tolist()) == list(range(len(labels)))
    np.testing.assert_array_equal(served['image'][..., 0], images[order])
    np.testing.assert_array_equal(served['label'], labels[order])
  assert os.path.isdir(tmp_path / 'tfds' / 'fashion_mnist_local')
  # Served by tfds itself, without TensorFlow, from the array_record files.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  source = tfds.data_source('fashion_mnist_local', split='test', data_dir=config.data_dir,
                            download=False)
  assert sorted(int(source[i]['image'][0, 0, 0]) for i in range(NUM_TEST)) == list(
      range(NUM_TEST))
  assert len(pipeline.load_arrays(config, 'test', limit=5)['label']) == 5


def test_missing_files_say_how_to_install(tmp_path):
  config = data_config(tmp_path, tmp_path / 'idx')
  os.makedirs(tmp_path / 'idx')
  with pytest.raises(FileNotFoundError, match='apt-get install dataset-fashion-mnist'):
    pipeline.data_source(config, 'train')
  # Once the files are there, the same data_dir works (the failure left nothing half-made).
  write_fashion_idx(tmp_path / 'idx')
  assert len(pipeline.data_source(config, 'train')) == NUM_TRAIN


def test_truncated_idx_file_is_refused(tmp_path):
  path = tmp_path / 'x-idx3-ubyte'
  write_idx(path, np.zeros((4, 28, 28), np.uint8))
  data = path.read_bytes()
  path.write_bytes(data[:-5])
  with pytest.raises(ValueError, match='truncated'):
    fashion_mnist.read_idx(str(path))


def test_batches_are_deterministic_for_a_seed(source):
  def first(seed, n=7):  # 7 steps cross the epoch boundary (5 steps per epoch)
    batches = pipeline.Batches(source, 8, seed)
    return [ids(next(batches)) for _ in range(n)]

  a, b, other = first(0), first(0), first(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any((x != y).any() for x, y in zip(a, other))
  # Within an epoch every example comes at most once, and epochs are shuffled differently.
  epoch0 = np.concatenate(a[:5])
  assert len(set(epoch0.tolist())) == 40
  assert (a[5] != a[0]).any()


def test_batches_resume_from_a_step(source):
  fresh = pipeline.Batches(source, 8, seed=3)
  reference = [next(fresh) for _ in range(12)]
  for s in (0, 4, 5, 11):
    resumed = pipeline.Batches(source, 8, seed=3, start_step=s)
    for batch in (next(resumed), resumed.batch_at(s)):
      np.testing.assert_array_equal(batch['image'], reference[s]['image'])
      np.testing.assert_array_equal(batch['label'], reference[s]['label'])
    assert batch['label'].dtype == np.int32


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_slices_partition_the_global_batch(source, process_count):
  whole = pipeline.Batches(source, 16, seed=0, process_index=0, process_count=1)
  for step in (0, 1, 3):
    parts = [pipeline.Batches(source, 16, seed=0, process_index=p,
                              process_count=process_count).batch_at(step)
             for p in range(process_count)]
    assert all(len(part['label']) == 16 // process_count for part in parts)
    np.testing.assert_array_equal(np.concatenate([ids(p) for p in parts]),
                                  ids(whole.batch_at(step)))


def test_batch_size_errors(source):
  with pytest.raises(ValueError, match='multiple of 3'):
    pipeline.Batches(source, 16, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='exceeds'):
    pipeline.Batches(source, 48, seed=0)
