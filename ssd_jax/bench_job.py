"""bench.py's job: speed and fidelity of every method/setting on one checkpoint.

Every setting samples the same classes with the same seeds (image i uses key
fold_in(key(seed), i)), so differences come from the method alone. Plain AR at `seed` is
the baseline of every speed-up and FID-vs-AR; AR again at `noise_seed` gives the noise
level: the FID between two samples of the very same distribution at this number of images.
A setting whose FID against AR is at that level is statistically indistinguishable from AR.

A method listed in config.num_images_by_method makes fewer images (n): it is compared with
AR's first n images, which are the images an n-image AR run makes, against the noise level
over the first n of both AR runs. Intervals tell a loss from noise: the noise level's is
the spread of FID between two n-image AR samples (the two AR runs' images i swapped at
random), a setting's a paired bootstrap interval around its FID vs AR.
"""

import dataclasses
import os
import types

import jax
import numpy as np
from tqdm import tqdm

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.data import pipeline
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.eval import features as features_lib
from ssd_jax.eval import fid as fid_lib
from ssd_jax.eval import metrics
from ssd_jax.eval import report


@dataclasses.dataclass
class Setting:
  label: str
  method: registry.Method
  options: object
  seed: int
  num_images: int


def settings_of(config):
  """The settings to benchmark (AR first, twice), each method's options and images checked."""
  check_counts(config)
  ar = registry.get('ar')
  settings = [Setting('ar', ar, registry.NoOptions(), config.seed, config.num_images),
              Setting(f'ar (seed {noise_seed(config)})', ar, registry.NoOptions(),
                      noise_seed(config), config.num_images)]
  for label, method, options in engine.resolve_settings(config.settings):
    if label not in [s.label for s in settings]:
      settings.append(Setting(label, method, options, config.seed,
                              images_of(config, method.name)))
  return settings


def images_of(config, name):
  """The number of images of method `name`, refused if FID vs AR cannot use it."""
  n = config.num_images_by_method.get(name, config.num_images)
  if not 2 <= n <= config.num_images:
    # AR's first n images stand in for an n-image AR run only while n <= its count.
    raise ValueError(f'--config.num_images_by_method.{name}={n}: use 2 (FID needs two '
                     f'images) to --config.num_images={config.num_images} (FID vs AR '
                     "compares with AR's first n images).")
  return n


def check_counts(config):
  """Refuses too few images, unknown methods in num_images_by_method and bad intervals."""
  if config.num_images < 2:
    raise ValueError(f'--config.num_images={config.num_images}: FID needs at least 2 images.')
  for name, n in config.num_images_by_method.items():
    field = f'--config.num_images_by_method.{name}={n}'
    if name not in registry.names():
      raise ValueError(f'{field}: unknown method {name!r}; choose among '
                       f'{", ".join(registry.names())}.')
    if name == 'ar':
      raise ValueError(f'{field}: AR is the reference of every count; set '
                       '--config.num_images instead.')
  if config.fid.bootstrap < 0 or not 0 < config.fid.interval < 1:
    raise ValueError(f'--config.fid.bootstrap={config.fid.bootstrap} --config.fid.interval='
                     f'{config.fid.interval}: use bootstrap >= 0 (0 = no intervals) and '
                     '0 < interval < 1.')


def against_ar(feats, counts, resamples, level, seed):
  """FID vs AR of every setting at its own image count, and the noise level at each count.

  feats: [N_i, F] per setting, AR at the seed first and at the noise seed second (both at
  the largest count); counts: the N_i. Setting i is compared with AR's first N_i images;
  the noise level at n is FID(AR other seed[:n], AR[:n]). Intervals (the noise level's:
  fid.null_interval; a setting's: fid.bootstrap_interval; the same `seed` for all) are None
  when resamples is 0. Returns (a dict per setting, {n: {'fid': ..., 'interval': [lo, hi]}}).
  """
  base, other = feats[0], feats[1]

  def compare(x, n):
    # Image i has the same class in every run: resample pairs, keeping the class mix.
    interval = (list(fid_lib.bootstrap_interval(x, base[:n], resamples, level, seed,
                                                paired=True)) if resamples else None)
    return fid_lib.fid(x, base[:n]), interval

  def noise_at(n):
    interval = (list(fid_lib.null_interval(other[:n], base[:n], resamples, level, seed))
                if resamples else None)
    return {'fid': fid_lib.fid(other[:n], base[:n]), 'interval': interval}

  noise = {n: noise_at(n) for n in sorted(set(counts), reverse=True)}
  out = []
  for i, (x, n) in enumerate(zip(feats, counts)):
    if i == 0:
      fid_ar, interval = None, None
    elif i == 1:  # AR at the other seed: the noise level itself
      fid_ar, interval = noise[n]['fid'], noise[n]['interval']
    else:
      fid_ar, interval = compare(x, n)
    out.append(dict(
        num_images=n, fid_ar=fid_ar, fid_ar_interval=interval, noise_fid=noise[n]['fid'],
        noise_interval=noise[n]['interval'],
        fid_ar_over_noise=None if i == 0 else fid_ar / max(noise[n]['fid'], 1e-12)))
  return out, noise


def noise_seed(config):
  return config.seed + 1 if config.noise_seed < 0 else config.noise_seed


def load_real_images(fid, classes, image_shape):
  data = pipeline.load_arrays(types.SimpleNamespace(
      name=fid.data_name, data_dir=fid.data_dir, idx_dir=fid.idx_dir), fid.split)
  keep = np.isin(data['label'], classes)
  images = data['image'][keep][:fid.num_real]
  if images.shape[1:] != image_shape:
    raise ValueError(f'the {fid.data_name} {fid.split} images are {images.shape[1:]} but the '
                     f'checkpoint makes {image_shape}; set --config.fid.data_name / data_dir '
                     'to the dataset the checkpoint was trained on.')
  return images


def run(config, out_dir, command=''):
  """Benchmarks config.settings against plain AR; writes results.* into out_dir."""
  settings = settings_of(config)
  sampling = sampling_lib.Sampling(**config.sampling.to_dict()).validate(float('inf'))
  classes = list(config.classes) or None
  needs = [stage for s in settings for stage in s.method.needs]
  bundle = pretrained.load(config.checkpoint or None, stages=needs)
  judge_dir = config.fid.classifier or os.path.join(bundle.run_dir, 'classifier')
  if not os.path.exists(os.path.join(judge_dir, 'model.json')):
    raise FileNotFoundError(
        f'no classifier stage in {judge_dir}; train one with `python train.py '
        f'--config=configs/classifier.py --workdir={bundle.run_dir}` or set '
        '--config.fid.classifier=DIR.')
  judge = features_lib.ClassifierExtractor(judge_dir)
  metrics.check_fits(bundle, judge)
  extractor = features_lib.load_extractor(config.fid.features,
                                          config.fid.features_path or None, judge)
  labels = engine.class_labels(config.num_images, bundle.model.num_classes, classes)
  h, w = (g * bundle.tokenizer.factor for g in bundle.model.grid)
  real = load_real_images(config.fid, np.unique(labels),
                          (h, w, bundle.tokenizer.image_channels))
  real_features = features_lib.extract(extractor, real)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model)
  token_nll = metrics.token_nll_bits_fn(bundle.model, bundle.params)

  rows, feats, grids = [], [], []
  ncols = min(10, *(s.num_images for s in settings))
  log = jax.process_index() == 0  # every process runs every setting; one reports
  for s in tqdm(settings, desc='settings', unit='setting',
                disable=not config.progress or not log):
    result = engine.generate(bundle, s.method.name, sampling, s.num_images,
                             config.batch_size, classes, s.seed, s.options, mesh,
                             config.progress)
    images = bundle.decode_images(result.tokens)
    feats.append(features_lib.extract(extractor, images))
    grids.append(images[:ncols])
    row = dict(label=s.label, seed=s.seed, **{k: result.stats[k] for k in (
        'method', 'lossless', 'options', 'num_images', 'target_passes', 'draft_passes',
        'target_passes_per_batch', 'tokens_per_pass', 'compile_seconds', 'run_seconds',
        'images_per_second')})
    row['fid_real'] = fid_lib.fid(feats[-1], real_features)
    row['class_accuracy'] = metrics.class_accuracy(judge.predict(images), result.labels)
    row['nll_bits'] = token_nll(result.tokens, result.labels)
    rows.append(row)
    if log:
      tqdm.write(report.row_line(row))

  base = rows[0]
  fidelity, noise = against_ar(feats, [s.num_images for s in settings], config.fid.bootstrap,
                               config.fid.interval, config.seed)
  for row, extra in zip(rows, fidelity):
    # Per batch and per image: rows may make fewer images (fewer batches) than AR.
    row['speedup_passes'] = base['target_passes_per_batch'] / row['target_passes_per_batch']
    row['speedup_wall'] = row['images_per_second'] / base['images_per_second']
    row.update(extra)
  summary = dict(
      command=command, args=config.to_dict(), checkpoint=report.relative(bundle.run_dir),
      classifier=report.relative(judge_dir), features=config.fid.features,
      num_real_images=len(real), real_split=config.fid.split,
      sampling=dataclasses.asdict(sampling), noise_fid=noise[config.num_images]['fid'],
      noise_by_images=noise, machine=report.machine(),
      classifier_test_accuracy=report.stage_result(judge_dir, 'test_accuracy'), rows=rows)
  if log:
    report.write_all(out_dir, summary, np.concatenate(grids), ncols=ncols)
  return summary


def summary_line(summary, out_dir):
  """bench.py's last line."""
  levels = ', '.join(f'{report.with_interval(v["fid"], v["interval"])} at {n} images'
                     for n, v in summary['noise_by_images'].items())
  return (f'noise level (AR vs AR, another seed): FID {levels}; wrote '
          f'{out_dir}/results.md, results.json, speedup_vs_fid.png, samples.png')
