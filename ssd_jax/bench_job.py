"""bench.py's job: speed and fidelity of every method/setting on one checkpoint.

Every setting samples the same classes with the same seeds (image i uses key
fold_in(key(seed), i)), so differences come from the method alone. Plain AR at `seed` is
the baseline of every speed-up and FID-vs-AR; AR again at `noise_seed` gives the noise
level: the FID between two samples of the very same distribution at this number of images.
A setting whose FID against AR is at that level is statistically indistinguishable from AR.
"""

import ast
import dataclasses
import os
import types
from typing import Optional, Sequence

import jax
import numpy as np
from tqdm import tqdm

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.data import pipeline
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.eval import features as features_lib
from ssd_jax.eval import fid as fid_lib
from ssd_jax.eval import metrics
from ssd_jax.eval import report
from ssd_jax.models import vq


@dataclasses.dataclass
class BenchArgs:
  methods: Sequence[str] = ('ar', 'speculative', 'ssd')
  ssd_rounds: Sequence[int] = ()   # ssd once per value (sugar for --setting=ssd:ssd_rounds=r)
  options: Sequence[str] = ()      # 'key=value' engine.Options for every setting
  settings: Sequence[str] = ()     # extra settings 'method:key=value,key=value'
  num_images: int = 1000
  batch_size: int = 64
  classes: Optional[Sequence[int]] = None
  cfg_scale: float = 2.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  noise_seed: Optional[int] = None  # seed of the second AR sample; None = seed + 1
  checkpoint: Optional[str] = None
  classifier: Optional[str] = None  # classifier stage folder; None = <checkpoint>/classifier
  features: str = 'classifier'      # FID extractor (see ssd_jax/eval/features.py)
  features_path: Optional[str] = None
  data_name: str = 'fashion_mnist_local'
  data_dir: str = ''
  idx_dir: str = ''
  real_split: str = 'test'
  num_real: int = 10000
  out_dir: str = 'bench'
  mesh_data: int = -1
  mesh_model: int = 1
  progress: bool = True
  command: str = ''                 # recorded in results.md


@dataclasses.dataclass
class Setting:
  label: str
  method: str
  options: engine.Options
  seed: int


def _convert(key, value, default):
  try:
    if isinstance(default, bool):
      if value.lower() not in ('true', 'false', '1', '0'):
        raise ValueError(value)
      return value.lower() in ('true', '1')
    if isinstance(default, (int, float, str)):
      return type(default)(value)
    return ast.literal_eval(value)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f'option {key}={value!r}: expected a {type(default).__name__}.') from e


def parse_options(pairs, where):
  """['key=value', ...] -> {field: typed value} of engine.Options."""
  defaults = engine.Options()
  known = {f.name for f in dataclasses.fields(engine.Options)}
  out = {}
  for pair in pairs:
    key, sep, value = pair.partition('=')
    key = key.strip()
    if not sep or key not in known:
      raise ValueError(f'{where}: {pair!r} is not key=value with a key among '
                       f'{", ".join(sorted(known))}.')
    out[key] = _convert(key, value.strip(), getattr(defaults, key))
  return out


def parse_settings(args):
  """The settings to benchmark besides the AR baseline, validated before anything loads."""
  common = parse_options(args.options, '--options')
  requested = []  # (method, overrides)
  for name in args.methods:
    engine.get_method(name)
    if name == 'ssd' and args.ssd_rounds:
      requested += [(name, {'ssd_rounds': int(r)}) for r in args.ssd_rounds]
    elif name != 'ar':  # AR always runs, as the baseline
      requested.append((name, {}))
  if args.ssd_rounds and 'ssd' not in args.methods:
    raise ValueError('--ssd_rounds applies to method ssd, which is not in --methods.')
  for text in args.settings:
    name, _, rest = text.partition(':')
    engine.get_method(name)
    requested.append((name, parse_options([p for p in rest.split(',') if p],
                                          f'--setting={text}')))
  base = engine.Options(**common).validate()
  settings = [Setting('ar', 'ar', base, args.seed),
              Setting(f'ar (seed {noise_seed(args)})', 'ar', base, noise_seed(args))]
  for name, overrides in requested:
    label = ' '.join([name] + [f'{k}={v}' for k, v in overrides.items()])
    if label not in [s.label for s in settings]:
      options = dataclasses.replace(base, **overrides).validate()
      settings.append(Setting(label, name, options, args.seed))
  return settings


def noise_seed(args):
  return args.seed + 1 if args.noise_seed is None else args.noise_seed


def load_real_images(args, classes, image_shape):
  data = pipeline.load_arrays(types.SimpleNamespace(
      name=args.data_name, data_dir=args.data_dir, idx_dir=args.idx_dir), args.real_split)
  keep = np.isin(data['label'], classes)
  images = data['image'][keep][:args.num_real]
  if images.shape[1:] != image_shape:
    raise ValueError(f'the {args.data_name} {args.real_split} images are '
                     f'{images.shape[1:]} but the checkpoint makes {image_shape}; pass the '
                     'dataset the checkpoint was trained on (--data_name, --data_dir).')
  return images


def image_decoder(bundle, batch_size=256):
  """tokens [N, H, W] -> uint8 images, compiled once for all settings."""
  fn = jax.jit(lambda t: vq.unit_to_uint8(bundle.tokenizer.apply(
      {'params': bundle.tokenizer_params}, t, method=bundle.tokenizer.decode)))
  return lambda tokens: features_lib.batched(fn, tokens, batch_size)


def run(args: BenchArgs):
  if args.num_images < 2:
    raise ValueError(f'--num_images={args.num_images}: FID needs at least 2 images.')
  settings = parse_settings(args)
  sampling = sampling_lib.Sampling(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, cfg_scale=args.cfg_scale)
  bundle = pretrained.load(args.checkpoint, need_heads=any(
      engine.get_method(s.method).needs_heads for s in settings))
  judge_dir = args.classifier or os.path.join(bundle.run_dir, 'classifier')
  if not os.path.exists(os.path.join(judge_dir, 'model.json')):
    raise FileNotFoundError(
        f'no classifier stage in {judge_dir}; train one with `python train.py '
        f'--config=configs/classifier.py --workdir={bundle.run_dir}` or pass --classifier=DIR.')
  judge = features_lib.ClassifierExtractor(judge_dir)
  metrics.check_fits(bundle, judge)
  extractor = features_lib.load_extractor(args.features, args.features_path, judge)
  labels = engine.class_labels(args.num_images, bundle.model.num_classes, args.classes)
  h, w = (g * bundle.tokenizer.factor for g in bundle.model.grid)
  real = load_real_images(args, np.unique(labels), (h, w, bundle.tokenizer.image_channels))
  real_features = features_lib.extract(extractor, real)
  mesh = sharding.make_mesh(args.mesh_data, args.mesh_model)
  decode = image_decoder(bundle)
  token_nll = metrics.token_nll_bits_fn(bundle.model, bundle.params)

  rows, feats, grids = [], {}, []
  log = jax.process_index() == 0  # every process runs every setting; one reports
  for s in tqdm(settings, desc='settings', unit='setting', disable=not args.progress or not log):
    result = engine.generate(bundle, s.method, sampling, args.num_images, args.batch_size,
                             args.classes, s.seed, s.options, mesh, args.progress)
    images = decode(result.tokens)
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
      command=args.command, args=dataclasses.asdict(args), checkpoint=bundle.run_dir,
      classifier=judge_dir, features=args.features, num_real_images=len(real),
      sampling=dataclasses.asdict(sampling), noise_fid=noise, machine=report.machine(),
      classifier_test_accuracy=report.stage_result(judge_dir, 'test_accuracy'), rows=rows)
  if log:
    report.write_all(args.out_dir, summary, np.concatenate(grids), ncols=len(grids[0]))
  return summary
