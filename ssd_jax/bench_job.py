"""bench.py's job: speed and fidelity of every method/setting on one checkpoint.

Every setting samples the same classes with the same seeds (image i uses key
fold_in(key(seed), i)), so differences come from the method alone. Plain AR at `seed` is
the baseline of every speed-up and FID-vs-AR; AR again at `noise_seed` gives the noise
level: the FID between two samples of the very same distribution at this number of images.
A setting whose FID against AR is at that level is statistically indistinguishable from AR.
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


def settings_of(config):
  """The settings to benchmark (AR first, twice), each method's options validated."""
  settings = [Setting('ar', registry.get('ar'), registry.NoOptions(), config.seed),
              Setting(f'ar (seed {noise_seed(config)})', registry.get('ar'),
                      registry.NoOptions(), noise_seed(config))]
  for label, method, options in engine.resolve_settings(config.settings):
    if label not in [s.label for s in settings]:
      settings.append(Setting(label, method, options, config.seed))
  return settings


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
  if config.num_images < 2:
    raise ValueError(f'--config.num_images={config.num_images}: FID needs at least 2 images.')
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

  rows, feats, grids = [], {}, []
  log = jax.process_index() == 0  # every process runs every setting; one reports
  for s in tqdm(settings, desc='settings', unit='setting',
                disable=not config.progress or not log):
    result = engine.generate(bundle, s.method.name, sampling, config.num_images,
                             config.batch_size, classes, s.seed, s.options, mesh,
                             config.progress)
    images = bundle.decode_images(result.tokens)
    feats[s.label] = features_lib.extract(extractor, images)
    grids.append(images[:10])
    row = dict(label=s.label, seed=s.seed, **{k: result.stats[k] for k in (
        'method', 'lossless', 'options', 'target_passes', 'draft_passes', 'tokens_per_pass',
        'compile_seconds', 'run_seconds', 'images_per_second')})
    row['fid_real'] = fid_lib.fid(feats[s.label], real_features)
    row['class_accuracy'] = metrics.class_accuracy(judge.predict(images), result.labels)
    row['nll_bits'] = token_nll(result.tokens, result.labels)
    rows.append(row)
    if log:
      tqdm.write(report.row_line(row))

  base = rows[0]
  noise = fid_lib.fid(feats[rows[1]['label']], feats[base['label']])
  for row in rows:
    row['speedup_passes'] = base['target_passes'] / row['target_passes']
    row['speedup_wall'] = base['run_seconds'] / max(row['run_seconds'], 1e-9)
    row['fid_ar'] = None if row is base else fid_lib.fid(feats[row['label']],
                                                          feats[base['label']])
    row['fid_ar_over_noise'] = None if row is base else row['fid_ar'] / max(noise, 1e-12)
  summary = dict(
      command=command, args=config.to_dict(), checkpoint=report.relative(bundle.run_dir),
      classifier=report.relative(judge_dir), features=config.fid.features,
      num_real_images=len(real), real_split=config.fid.split,
      sampling=dataclasses.asdict(sampling), noise_fid=noise, machine=report.machine(),
      classifier_test_accuracy=report.stage_result(judge_dir, 'test_accuracy'), rows=rows)
  if log:
    report.write_all(out_dir, summary, np.concatenate(grids), ncols=len(grids[0]))
  return summary


def summary_line(summary, out_dir):
  """bench.py's last line."""
  return (f"noise level (AR vs AR, another seed): FID {summary['noise_fid']:.3f}; wrote "
          f'{out_dir}/results.md, results.json, speedup_vs_fid.png, samples.png')
