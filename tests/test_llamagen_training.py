"""Draft stages on an imported LlamaGen model: a tfds image dataset prepared on disk
(ImageNet-like: JPEG images of several sizes) is centre-cropped, tokenized once with the
imported VQ-16 into a cache, the heads stage trains on the frozen imported backbone from
that cache, and greedy speculative decoding with those heads equals greedy AR; then the
hawk_draft stage trains on the same run from the same cache (the images gone), and greedy
hawk equals greedy AR; so do the MuLo-SD stages, and mulo samples (at tau > 1 as AR)."""

import io
import json
import os
import shutil

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import helpers
from configs import hawk_draft as hawk_config
from configs import heads as heads_config
from configs import mulo_draft as mulo_draft_config
from configs import mulo_upsampler as mulo_upsampler_config
from ssd_jax import pretrained
from ssd_jax import sample_job
from ssd_jax.data import tokens as tokens_lib
from ssd_jax.importers import llamagen
from ssd_jax.training import inputs as inputs_lib
from ssd_jax.training import stages

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'llamagen')
NUM_CLASSES = 3
SIZES = ((24, 30), (36, 28), (20, 20), (45, 33))  # (h, w): crops of several aspect ratios


class TinyImages(tfds.core.GeneratorBasedBuilder):
  """Three classes of RGB JPEGs of several sizes: an ImageNet stand-in, written without
  TensorFlow (the JPEG bytes come from PIL; tfds decodes them with PIL too)."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    # DatasetInfo itself: dataset_info_from_configs looks for metadata in a package.
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        'image': tfds.features.Image(shape=(None, None, 3), encoding_format='jpeg'),
        'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(24, 0), 'validation': self._generate_examples(8, 1)}

  def _generate_examples(self, n, seed):
    rng = np.random.default_rng(seed)
    for i in range(n):
      label = i % NUM_CLASSES
      h, w = SIZES[i % len(SIZES)]
      # Class = dominant colour channel, with a gradient and noise: grids that differ.
      image = rng.integers(0, 60, (h, w, 3))
      image[..., label] += np.linspace(120, 195, w).astype(int)[None]
      buffer = io.BytesIO()
      Image.fromarray(image.astype(np.uint8)).save(buffer, format='JPEG', quality=95)
      yield i, {'image': buffer.getvalue(), 'label': label}


def prepare_tiny_images(data_dir):
  builder = TinyImages(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def import_tiny(out):
  """The golden tiny LlamaGen GPT (5x5 grid, 10 classes) and VQ-16 (factor 4: 20x20)."""
  assert llamagen.main([f'--gpt={GOLDEN}/gpt.safetensors', f'--vq={GOLDEN}/vq.safetensors',
                        '--image_size=80', '--num_heads=2', f'--out={out}']) == 0
  return out


def on_tiny_images(config, data_dir, num_steps):
  """A smoke config of a draft stage on TinyImages through the token cache."""
  config.data.name = 'tiny_images'
  config.data.data_dir = str(data_dir)
  config.data.train_split, config.data.eval_split = 'train', 'validation'
  config.data.image_size = 20  # the tiny VQ's factor 4 times the 5x5 grid
  config.data.pretokenize = True
  config.data.tokenize_batch = 8
  config.data.tokens_chunk = 10  # 24 training images: chunks of 10, 10 and 4
  config.num_steps = num_steps
  config.log_every = 4
  config.checkpoint_every = num_steps
  config.learning_rate = 3e-3
  config.eval_examples = 8
  return config


def heads_on_tiny_images(data_dir, num_steps=24):
  return on_tiny_images(heads_config.get_config('smoke'), data_dir, num_steps)


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  """The imported tiny run and TinyImages prepared for it, shared by the tests below (the
  heads test deletes the images after tokenizing; the hawk test then reads the cache)."""
  root = tmp_path_factory.mktemp('llamagen')
  run_dir = import_tiny(str(root / 'run'))
  prepare_tiny_images(str(root / 'tfds'))
  return dict(run_dir=run_dir, data_dir=root / 'tfds', root=root)


def sample_tokens(run_dir, method, out_dir, options=None):
  """sample.py's job on the run: 8 greedy CFG-2 samples, their tokens."""
  args = sample_job.SampleArgs(method=method, tokens_out=str(out_dir / f'{method}.npy'),
                               checkpoint=run_dir, num_images=8, batch_size=8,
                               temperature=0.0, cfg_scale=2.0, progress=False, out='',
                               options=options)
  report = sample_job.run(args)
  return np.load(args.tokens_out), report


def test_center_crop_is_llamagens():
  """Halve with a box filter while the short side allows, bicubic, crop the middle."""
  image = np.random.default_rng(0).integers(0, 255, (90, 50, 3)).astype(np.uint8)
  out = tokens_lib.center_crop(image, 20, 20)
  pil = Image.fromarray(image).resize((25, 45), resample=Image.BOX)
  pil = pil.resize((20, 36), resample=Image.BICUBIC)  # short side 25 -> 20
  np.testing.assert_array_equal(out, np.asarray(pil)[8:28])
  grey = np.zeros((20, 20, 1), np.uint8)
  assert tokens_lib.center_crop(grey, 20, 20).shape == (20, 20, 1)
  assert tokens_lib.to_channels(grey, 3).shape == (20, 20, 3)


def test_heads_train_on_an_imported_model_and_speculative_equals_ar(tiny_run):
  run_dir, data_dir = tiny_run['run_dir'], tiny_run['data_dir']
  config = heads_on_tiny_images(data_dir)
  config.lock()
  _, results = stages.run(config, run_dir)

  # Tokenized once into <workdir>/tokens/<dataset>/<split>/, as chunks.
  cached = os.path.join(run_dir, 'tokens', 'tiny_images', 'train')
  assert sorted(f for f in os.listdir(cached) if f.startswith('tokens-')) == [
      'tokens-00000.npy', 'tokens-00001.npy', 'tokens-00002.npy']
  with open(os.path.join(cached, 'meta.json')) as f:
    meta = json.load(f)
  assert meta['split_examples'] == 24 and meta['grid'] == [5, 5]
  assert meta['image_size'] == [20, 20] and meta['preprocess'] == tokens_lib.PREPROCESS

  # The cache is what the imported VQ-16 makes of the centre-cropped images.
  tok, tok_params, tok_spec = pretrained.load_stage(os.path.join(run_dir, 'tokenizer'),
                                                    'tokenizer')
  source = tfds.data_source('tiny_images', split='train', data_dir=str(data_dir))
  crops = np.stack([tokens_lib.center_crop(source[i]['image'], 20, 20) for i in range(24)])
  want = tok.apply({'params': tok_params}, crops.astype(np.float32) / 127.5 - 1.0,
                   method=tok.encode)
  model = pretrained.load_stage(os.path.join(run_dir, 'ar'), 'ar')[0]
  inputs = inputs_lib.StageInputs(config, run_dir, tok, tok_spec, tok_params, model)
  got = inputs.train_source().arrays()
  assert (got['tokens'] == np.asarray(want)).mean() > 0.99  # batched vs one-shot encoder
  np.testing.assert_array_equal(got['label'], [int(source[i]['label']) for i in range(24)])

  # A second run reuses the cache: it needs the images no more.
  shutil.rmtree(data_dir)
  again = inputs.train_source().arrays()
  np.testing.assert_array_equal(again['tokens'], got['tokens'])

  # The heads learned: the loss fell (Smooth-L1 on this random model's large hidden states
  # falls slowly; the cross-entropy towards the backbone's p by a third in 24 steps).
  with open(os.path.join(run_dir, 'heads', 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  assert logged[-1]['loss'] < logged[0]['loss'] - 1.0, logged
  assert logged[-1]['ce'] < 0.8 * logged[0]['ce'], logged
  assert set(results) >= {'horizontal_1', 'vertical_1', 'step'}

  # sample.py's job on the run: greedy speculative with the trained heads is greedy AR.
  tokens = {}
  for method in ('ar', 'speculative'):
    tokens[method], report = sample_tokens(run_dir, method, tiny_run['root'])
  assert report['target_passes'] >= 1
  bundle = pretrained.load(run_dir)
  labels = np.arange(8) % bundle.model.num_classes
  helpers.assert_greedy_equal(bundle, tokens['speculative'], tokens['ar'], labels, 2.0,
                              'speculative')


def test_hawk_trains_on_the_same_cache_and_hawk_equals_ar(tiny_run):
  """hawk_draft on the imported run, from the token cache the heads test made (the images
  are gone by then; run alone, this test tokenizes them itself)."""
  run_dir = tiny_run['run_dir']
  config = on_tiny_images(hawk_config.get_config('smoke'), tiny_run['data_dir'], 12)
  config.learning_rate, config.log_every = 1e-2, 1
  config.lock()
  _, results = stages.run(config, run_dir)
  with open(os.path.join(run_dir, 'hawk_draft', 'metrics.jsonl')) as f:
    logged = [json.loads(line) for line in f]
  losses = [m['loss'] for m in logged]
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  for mode in ('horizontal', 'horizontal_chain', 'vertical'):
    assert 0 <= results[mode]['top1_agreement'] <= 1
    assert 0 < results[mode]['acceptance'] <= 1

  # sample.py's job: greedy hawk with the trained drafter is greedy AR.
  want, _ = sample_tokens(run_dir, 'ar', tiny_run['root'])
  got, report = sample_tokens(run_dir, 'hawk', tiny_run['root'])
  assert report['target_passes'] >= 1
  bundle = pretrained.load(run_dir)
  labels = np.arange(8) % bundle.model.num_classes
  helpers.assert_greedy_equal(bundle, got, want, labels, 2.0, 'hawk')


def test_mulo_stages_train_on_the_same_cache_and_sample(tiny_run):
  """mulo_draft and mulo_upsampler from the same cache. The tiny run's 5x5 grid pools only
  by 5 (a 1x1 draft): the degenerate case, but every path of a real one (pooling the
  cached grids through the imported codebook, both stages, their evaluations, sampling)."""
  run_dir = tiny_run['run_dir']
  results = {}
  for stage, module in (('mulo_draft', mulo_draft_config),
                        ('mulo_upsampler', mulo_upsampler_config)):
    config = on_tiny_images(module.get_config('smoke'), tiny_run['data_dir'], 6)
    config.factor = 5
    if stage == 'mulo_draft':
      config.samples_per_class = 0  # no sample grid, as configs/llamagen/ (1000 classes)
    config.learning_rate, config.log_every = 1e-2, 1
    config.lock()
    _, results[stage] = stages.run(config, run_dir)
  assert 0 < results['mulo_draft']['val_bits_per_token'] < 15
  up = results['mulo_upsampler']
  assert 0 <= up['token_accuracy'] <= 1 and up['psnr_upsampled_vs_reconstruction'] > 0
  bundle = pretrained.load(run_dir)
  labels = np.arange(8) % bundle.model.num_classes
  # tau > 1 rejects every drafted token: one island in raster order, plain AR.
  want, _ = sample_tokens(run_dir, 'ar', tiny_run['root'])
  got, report = sample_tokens(run_dir, 'mulo', tiny_run['root'], {'tau': 1.5})
  assert report['target_passes'] == 25  # verify + the 24 tokens after token 0, one by one
  helpers.assert_greedy_equal(bundle, got, want, labels, 2.0, 'mulo tau=1.5')
  got, report = sample_tokens(run_dir, 'mulo', tiny_run['root'])  # its default tau
  assert got.shape == (8, 5, 5) and 1 <= report['target_passes'] <= 25


def test_the_other_head_methods_run_on_the_imported_run(tiny_run):
  """ssd and lantern with the heads trained above: with greedy decoding, ssd with W - 1
  rounds per row is AR (the rounds converge) and lantern with delta 0 is speculative.
  With the tests above, every registered method has now sampled the imported run."""
  run_dir, root = tiny_run['run_dir'], tiny_run['root']
  if not os.path.isdir(os.path.join(run_dir, 'heads')):
    pytest.skip('needs the heads trained by the heads test of this module')
  bundle = pretrained.load(run_dir)
  labels = np.arange(8) % bundle.model.num_classes
  width = bundle.model.grid[1]
  want, _ = sample_tokens(run_dir, 'ar', root)
  got, report = sample_tokens(run_dir, 'ssd', root, {'rounds': width - 1})
  helpers.assert_greedy_equal(bundle, got, want, labels, 2.0, 'ssd rounds=W-1')
  spec, _ = sample_tokens(run_dir, 'speculative', root)
  got, _ = sample_tokens(run_dir, 'lantern', root, {'delta': 0.0, 'k': 4})
  np.testing.assert_array_equal(got, spec)


@pytest.fixture(scope='module')
def tiny_vq(tiny_run):
  return pretrained.load_stage(os.path.join(tiny_run['run_dir'], 'tokenizer'), 'tokenizer')


def test_imagenet2012_mock_data_is_tokenized_once(tmp_path, tiny_vq):
  """tfds's own mock of imagenet2012 (random JPEG-free images of random sizes, 1000
  classes) through the cache; reused without the dataset; refused for another tokenizer."""
  tok, params, spec = tiny_vq
  data = heads_on_tiny_images(tmp_path).data
  data.name = 'imagenet2012'
  make = lambda p: tokens_lib.TokenCache(data, str(tmp_path / 'tokens'), tok, p,
                                         spec['tokenizer'], (5, 5), batch_size=8,
                                         chunk_size=4)
  with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
    first = make(params).source('train').arrays()
  assert first['tokens'].shape == (6, 5, 5) and first['tokens'].dtype == np.int32
  assert first['label'].max() < 1000
  again = make(params).source('train', limit=5).arrays()  # no mock: the images are gone
  np.testing.assert_array_equal(again['tokens'], first['tokens'][:5])
  other = jax.tree.map(lambda x: x * 1.5, params)
  with pytest.raises(ValueError, match='tokenizer: .* there'):
    make(other).source('train')
