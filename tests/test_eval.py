"""Fidelity measures (FID, class accuracy) and the benchmark harness end to end."""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ssd_jax import bench_job
from ssd_jax.eval import features as features_lib
from ssd_jax.eval import fid as fid_lib
from ssd_jax.eval import metrics


def test_fid_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).normal(size=(500, 8))
  assert abs(fid_lib.fid(x, x)) < 1e-6


def test_fid_of_clearly_different_sets_is_large():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(500, 8))
  b = rng.normal(loc=3.0, scale=2.0, size=(500, 8))
  same = fid_lib.fid(a, rng.normal(size=(500, 8)))
  assert fid_lib.fid(a, b) > 50 * max(same, 1e-3)
  assert fid_lib.fid(a, b) > 70  # 8 * 3^2 for the means alone


def test_fid_matches_direct_computation():
  rng = np.random.default_rng(2)
  a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
  b = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 0.5
  mu_a, mu_b = a.mean(0), b.mean(0)
  cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  # tr((A B)^1/2) = tr((A^1/2 B A^1/2)^1/2): a symmetric route, independent of fid.py's.
  root_a = scipy.linalg.sqrtm(cov_a).real
  direct = (np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b)
            - 2 * np.trace(scipy.linalg.sqrtm(root_a @ cov_b @ root_a).real))
  np.testing.assert_allclose(fid_lib.fid(a, b), direct, rtol=1e-6)


def test_fid_of_one_dimensional_gaussians_has_closed_form():
  a, b = np.array([[0.0], [2.0]]), np.array([[5.0], [9.0]])  # std sqrt(2) and sqrt(8)
  np.testing.assert_allclose(fid_lib.fid(a, b), (1 - 7) ** 2 + (2 ** 0.5 - 8 ** 0.5) ** 2)


def test_bootstrap_interval_is_reproducible_and_separates_a_shift():
  rng = np.random.default_rng(4)
  a, b = rng.normal(size=(300, 4)), rng.normal(size=(300, 4))
  shifted = rng.normal(loc=0.5, size=(300, 4))
  same = fid_lib.bootstrap_interval(a, b, 50, 0.9, seed=0)
  assert same[0] <= same[1]
  assert fid_lib.bootstrap_interval(a, b, 50, 0.9, seed=0) == same
  assert fid_lib.bootstrap_interval(a, b, 50, 0.9, seed=1) != same
  assert fid_lib.bootstrap_interval(a, b, 50, 0.5, seed=0)[1] <= same[1]  # narrower
  apart = fid_lib.bootstrap_interval(a, shifted, 50, 0.9, seed=0)
  assert apart[0] > same[1]  # 4 * 0.5^2 = 1 apart, far beyond the noise of 300 samples
  # Centred on the measured value (the resampling bias removed), at high dimension too,
  # where raw resamples sit far above it.
  wide_a, wide_b = rng.normal(size=(100, 32)), rng.normal(size=(100, 32))
  for paired in (False, True):
    lo, hi = fid_lib.bootstrap_interval(wide_a, wide_b, 50, 0.9, seed=0, paired=paired)
    assert lo <= fid_lib.fid(wide_a, wide_b) <= hi
  with pytest.raises(ValueError, match='resamples'):
    fid_lib.bootstrap_interval(a, b, 0, 0.9)


def test_null_interval_is_the_spread_of_fid_between_two_samples_of_one_distribution():
  rng = np.random.default_rng(6)
  draw = lambda loc=0.0: rng.normal(loc=loc, size=(200, 8))
  lo, hi = fid_lib.null_interval(draw(), draw(), 100, 0.9, seed=0)
  assert lo <= hi and fid_lib.null_interval(draw(), draw(), 100, 0.9, seed=0) != (lo, hi)
  # Fresh pairs of one distribution mostly land inside; a shifted one lands above.
  inside = np.mean([lo <= fid_lib.fid(draw(), draw()) <= hi for _ in range(40)])
  assert inside >= 0.7
  assert fid_lib.fid(draw(), draw(0.5)) > hi
  with pytest.raises(ValueError, match='equal size'):
    fid_lib.null_interval(draw(), draw()[:10], 10)
  with pytest.raises(ValueError, match='equal size'):
    fid_lib.bootstrap_interval(draw(), draw()[:10], 10, paired=True)


def test_null_interval_keeps_the_class_mix_of_paired_samples():
  """Row i of both samples has the same class: the swaps keep both halves' class mix, so
  the null covers the FID of two fresh samples with that mix (a random split would mix
  classes unevenly and put the null above it)."""
  rng = np.random.default_rng(7)
  centres = rng.normal(scale=3.0, size=(10, 8))
  classes = np.arange(100) % 10
  draw = lambda: centres[classes] + rng.normal(size=(100, 8))
  lo, hi = fid_lib.null_interval(draw(), draw(), 100, 0.9, seed=0)
  inside = np.mean([lo <= fid_lib.fid(draw(), draw()) <= hi for _ in range(40)])
  assert inside >= 0.7


def test_each_setting_is_compared_with_the_first_n_ar_images():
  rng = np.random.default_rng(5)
  ar, other, full, small = (rng.normal(size=(n, 3)) for n in (12, 12, 12, 5))
  rows, noise = bench_job.against_ar([ar, other, full, small], [12, 12, 12, 5], 10, 0.9, 0)
  assert sorted(noise) == [5, 12]
  assert noise[5]['fid'] == fid_lib.fid(other[:5], ar[:5])
  assert noise[12]['fid'] == fid_lib.fid(other, ar)
  assert rows[3]['fid_ar'] == fid_lib.fid(small, ar[:5])
  assert rows[3]['noise_fid'] == noise[5]['fid'] and rows[2]['noise_fid'] == noise[12]['fid']
  assert rows[3]['fid_ar_interval'] == list(fid_lib.bootstrap_interval(small, ar[:5], 10, 0.9,
                                                                      paired=True))
  assert noise[5]['interval'] == list(fid_lib.null_interval(other[:5], ar[:5], 10, 0.9))
  assert rows[1]['fid_ar'] == noise[12]['fid'] and rows[1]['fid_ar_over_noise'] == 1.0
  assert rows[0]['fid_ar'] is None and rows[0]['fid_ar_interval'] is None
  assert [r['num_images'] for r in rows] == [12, 12, 12, 5]
  rows, noise = bench_job.against_ar([ar, other, small], [12, 12, 5], 0, 0.9, 0)
  assert rows[2]['fid_ar_interval'] is None and noise[5]['interval'] is None


@pytest.mark.parametrize('field, value, message', [
    ('ssd', 9, 'num_images_by_method.ssd=9: use 2 .* to --config.num_images=8'),
    ('ssd', 1, 'num_images_by_method.ssd=1: use 2'),
    ('warp', 4, "num_images_by_method.warp=4: unknown method 'warp'"),
    ('ar', 4, 'num_images_by_method.ar=4: AR is the reference'),
])
def test_bench_refuses_image_counts_before_loading(field, value, message):
  from configs import bench  # pylint: disable=g-import-not-at-top
  config = bench.get_config('smoke')
  config.checkpoint = '/nonexistent/run'  # loading it would fail with another message
  config.num_images_by_method[field] = value
  with pytest.raises(ValueError, match=message):
    bench_job.run(config, '/nonexistent/out')


def test_only_the_methods_that_run_need_a_usable_count():
  from configs import bench  # pylint: disable=g-import-not-at-top
  config = bench.get_config()
  config.num_images = 128  # below sjd's 256: refused while sjd runs, fine once it does not
  with pytest.raises(ValueError, match='num_images_by_method.sjd=256'):
    bench_job.settings_of(config)
  config.settings = (('ssd', {'rounds': 1}),)
  assert [s.num_images for s in bench_job.settings_of(config)] == [128, 128, 128]


def test_class_accuracy_on_a_toy_case():
  assert metrics.class_accuracy([0, 1, 2, 2], [0, 1, 1, 2]) == 0.75
  with pytest.raises(ValueError):
    metrics.class_accuracy([0, 1], [0, 1, 2])


def test_token_nll_of_a_uniform_model_is_log2_vocab():
  vocab = 16
  model = types.SimpleNamespace(apply=lambda variables, tokens, labels: (
      jnp.zeros(tokens.shape + (vocab,)), None))
  tokens = np.random.default_rng(3).integers(0, vocab, (11, 3, 5))
  nll = metrics.token_nll_bits_fn(model, params=None, batch_size=4)
  assert nll(tokens, np.zeros(11)) == pytest.approx(4.0)


def bench_config(smoke_run, **fields):
  from configs import bench  # pylint: disable=g-import-not-at-top
  config = bench.get_config('smoke')
  config.checkpoint = smoke_run.workdir
  config.fid.data_dir, config.fid.idx_dir = smoke_run.data_dir, smoke_run.idx_dir
  config.progress = False
  config.update(fields)
  return config


def test_plugged_in_extractor_from_a_file(tmp_path):
  path = tmp_path / 'my_features.py'
  path.write_text('import numpy as np\n'
                  'def make(scale=\'1\'):\n'
                  '  return lambda x: np.asarray(x, float).reshape(len(x), -1)[:, :4] * '
                  'float(scale)\n')
  fn = features_lib.load_extractor(f'{path}:make', '2')
  feats = features_lib.extract(fn, np.ones((3, 28, 28, 1), np.uint8))
  np.testing.assert_array_equal(feats, 2 * np.ones((3, 4)))
  with pytest.raises(ValueError):
    features_lib.load_extractor(f'{path}:missing')


def test_a_classifier_for_other_images_is_refused():
  bundle = types.SimpleNamespace(run_dir='run', model=types.SimpleNamespace(
      grid=(14, 14), num_classes=10), tokenizer=types.SimpleNamespace(
          factor=2, image_channels=1))
  judge = lambda **kw: types.SimpleNamespace(stage_dir='clf', module=types.SimpleNamespace(
      **dict(dict(image_size=28, image_channels=1, num_classes=10), **kw)))
  metrics.check_fits(bundle, judge())
  for kw in (dict(image_size=32), dict(image_channels=3), dict(num_classes=5)):
    with pytest.raises(ValueError):
      metrics.check_fits(bundle, judge(**kw))


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b''.join(
      int(d).to_bytes(4, 'big') for d in array.shape)
  with open(path, 'wb') as f:
    f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  """A run folder with every smoke stage, trained on tiny generated IDX files."""
  from configs import ar, classifier, heads, tokenizer  # pylint: disable=g-import-not-at-top
  from ssd_jax.training import stages  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('bench')
  idx_dir, data_dir, workdir = (str(root / n) for n in ('idx', 'tfds', 'run'))
  os.makedirs(idx_dir)
  rng = np.random.default_rng(0)
  for prefix, n in (('train', 64), ('t10k', 40)):
    labels = np.arange(n) % 10
    # Brightness by class, so the tiny classifier has something to learn.
    images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19
    _write_idx(os.path.join(idx_dir, f'{prefix}-images-idx3-ubyte'), images)
    _write_idx(os.path.join(idx_dir, f'{prefix}-labels-idx1-ubyte'), labels)
  for module in (tokenizer, ar, heads, classifier):
    config = module.get_config('smoke')
    config.data.idx_dir, config.data.data_dir = idx_dir, data_dir
    stages.run(config, workdir)
  return types.SimpleNamespace(workdir=workdir, idx_dir=idx_dir, data_dir=data_dir)


def test_bench_end_to_end_writes_table_json_and_plot(smoke_run, tmp_path):
  out_dir = str(tmp_path / 'out')
  config = bench_config(smoke_run, num_images=16, batch_size=8,
                        settings=(('speculative', {}), ('ssd', {'rounds': 0})))
  summary = bench_job.run(config, out_dir, command='python bench.py --smoke')
  for name in ('results.md', 'results.json', 'speedup_vs_fid.png', 'samples.png'):
    assert os.path.getsize(os.path.join(out_dir, name)) > 0, name
  with open(os.path.join(out_dir, 'results.json')) as f:
    saved = json.load(f)
  labels = [r['label'] for r in saved['rows']]
  assert labels == ['ar', 'ar (seed 1)', 'speculative', 'ssd rounds=0']
  rows = {r['label']: r for r in saved['rows']}
  assert rows['ar']['speedup_passes'] == 1.0 and rows['ar']['fid_ar'] is None
  assert rows['ar (seed 1)']['fid_ar'] == pytest.approx(summary['noise_fid'])
  # The smoke config gives ssd fewer images: it is compared at its own count.
  assert {label: r['num_images'] for label, r in rows.items()} == {
      'ar': 16, 'ar (seed 1)': 16, 'speculative': 16, 'ssd rounds=0': 4}
  assert sorted(saved['noise_by_images']) == ['16', '4']
  assert rows['ssd rounds=0']['noise_fid'] == saved['noise_by_images']['4']['fid']
  assert rows['speculative']['noise_fid'] == pytest.approx(summary['noise_fid'])
  assert rows['ar']['fid_ar_interval'] is None
  for row in saved['rows'][1:]:
    for key in ('fid_ar_interval', 'noise_interval'):
      assert row[key][0] <= row[key][1], (row['label'], key)
  for row in saved['rows']:
    assert 0.0 <= row['class_accuracy'] <= 1.0
    assert np.isfinite(row['fid_real']) and row['nll_bits'] > 0
  # Fewer target passes per image than AR is the whole point of the speculative methods.
  assert rows['ssd rounds=0']['target_passes'] < rows['ar']['target_passes']
  assert saved['checkpoint'] == smoke_run.workdir  # outside the repository: as given
  table = open(os.path.join(out_dir, 'results.md')).read()
  assert 'python bench.py --smoke' in table and '| ssd rounds=0 |' in table
  assert 'noise level' in table and '| images |' in table and '(90% interval)' in table
  assert '20 resamples' in table
  assert 'at 4 images' in bench_job.summary_line(summary, out_dir)


def test_bench_refuses_a_checkpoint_without_classifier_or_data(smoke_run, tmp_path):
  config = bench_config(smoke_run, settings=())
  config.fid.classifier = str(tmp_path / 'none')
  with pytest.raises(FileNotFoundError, match='no classifier stage'):
    bench_job.run(config, str(tmp_path))
  with pytest.raises(ValueError, match="unknown method 'warp'"):
    bench_job.run(bench_config(smoke_run, settings=(('warp', {}),)), str(tmp_path))
  config = bench_config(smoke_run, settings=())
  config.fid.data_dir, config.fid.idx_dir = str(tmp_path / 'no_tfds'), str(tmp_path / 'no_idx')
  with pytest.raises((ValueError, FileNotFoundError), match='no_idx|no_tfds'):
    bench_job.run(config, str(tmp_path))
