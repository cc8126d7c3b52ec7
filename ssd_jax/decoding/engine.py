"""Running a decoding method over many images: validation, batching, timing, statistics.

`generate` is what sample.py and bench.py call. A method is looked up in METHODS by name
and compiled once (static shapes): compile time is measured apart from run time, and the
batches (the last one padded) all reuse the compiled loop. Image i always gets the key
fold_in(key(seed), i), so its tokens do not depend on the batch size.
"""

import dataclasses
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ssd_jax import sharding
from ssd_jax.decoding import ar
from ssd_jax.decoding import drafts
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import speculative
from ssd_jax.decoding import ssd
from ssd_jax.decoding import target as target_lib


@dataclasses.dataclass(frozen=True)
class Options:
  """Knobs of the methods (each method reads the ones it has)."""
  draft_len: int = 4           # speculative / ssd row 0: drafts verified per pass
  ssd_rounds: int = 1          # ssd: verify-and-correct passes per row (r)
  horizontal_first: int = 0    # drafts from horizontal heads before vertical; 0 = auto

  def validate(self):
    if self.draft_len < 1:
      raise ValueError(f'--draft_len={self.draft_len} must be >= 1.')
    if self.ssd_rounds < 0:
      raise ValueError(f'--ssd_rounds={self.ssd_rounds} must be >= 0.')
    if self.horizontal_first < 0:
      raise ValueError(f'--horizontal_first={self.horizontal_first} must be >= 0 '
                       '(0 = choose from the heads\' measured acceptance).')
    return self


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  lossless: bool     # exact: greedy equals AR, sampled distribution equals the target's
  needs_heads: bool
  build: Callable    # (bundle, target, options) -> fn(params, labels, keys) -> (tokens, stats)
  summary: str


def _params(bundle):
  return {'backbone': bundle.params, 'heads': bundle.heads_params}


def horizontal_first_auto(bundle):
  """Horizontal offsets whose measured acceptance beats the vertical head's (at least 1)."""
  results = bundle.heads_results or {}
  vertical = results.get('vertical_1', {}).get('acceptance')
  if vertical is None:
    return 1
  count = 0
  for d in range(1, bundle.heads.num_horizontal + 1):
    if results.get(f'horizontal_{d}', {}).get('acceptance', 0.0) < vertical:
      break
    count = d
  return max(count, 1)


def _drafter(bundle, target, options):
  first = options.horizontal_first or horizontal_first_auto(bundle)
  return drafts.HeadDrafter(target, bundle.heads, first)


def _build_ar(bundle, target, options):
  del bundle, options
  return lambda params, labels, keys: ar.decode_ar(target, params['backbone'], labels, keys)


def _build_speculative(bundle, target, options):
  drafter = _drafter(bundle, target, options)
  return lambda params, labels, keys: speculative.decode_speculative(
      target, drafter, params, labels, keys, options.draft_len)


def _build_ssd(bundle, target, options):
  drafter = _drafter(bundle, target, options)
  return lambda params, labels, keys: ssd.decode_ssd(
      target, drafter, params, labels, keys, options.draft_len, options.ssd_rounds)


METHODS = {
    'ar': Method('ar', True, False, _build_ar, 'plain raster decoding (baseline)'),
    'speculative': Method('speculative', True, True, _build_speculative,
                          'exact speculative decoding, neighbour-head drafts (lossless)'),
    'ssd': Method('ssd', False, True, _build_ssd,
                  'SSD row schedule: vertical row drafts, r verify rounds (LOSSY)'),
}


def get_method(name):
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}; choose one of {", ".join(METHODS)}.')
  return METHODS[name]


def class_labels(num_images, num_classes, classes=None):
  """Labels [num_images]: `classes` (a list) cycled, default all classes cycled."""
  classes = list(range(num_classes)) if not classes else list(classes)
  for c in classes:
    if not 0 <= c < num_classes:
      raise ValueError(f'class {c} is out of range: this model has classes 0..'
                       f'{num_classes - 1}.')
  return np.asarray([classes[i % len(classes)] for i in range(num_images)], np.int32)


@dataclasses.dataclass
class Result:
  tokens: np.ndarray      # [num_images, H, W] int32
  labels: np.ndarray      # [num_images]
  stats: dict


def image_keys(seed, start, count):
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def build_decoder(bundle, method, sampling, options=Options(), mesh=None):
  """(jitted fn(params, labels, keys), params, method spec), placed on `mesh`."""
  spec = get_method(method)
  sampling.validate(bundle.model.vocab_size)
  options.validate()
  if spec.needs_heads and bundle.heads is None:
    raise ValueError(f'method {method!r} drafts with neighbour heads, but {bundle.run_dir} '
                     'has no heads/ stage; train it with configs/heads.py or use --method=ar.')
  target = target_lib.Target(bundle.model, sampling)
  fn = spec.build(bundle, target, options)
  mesh = mesh or sharding.make_mesh(-1, 1)
  batch = sharding.batch_sharding(mesh)
  params = jax.device_put(_params(bundle), sharding.replicated(mesh))
  jitted = jax.jit(fn, in_shardings=(sharding.replicated(mesh), batch, batch))
  return jitted, params, spec, mesh


def generate(bundle, method, sampling, num_images, batch_size, classes=None, seed=0,
             options=Options(), mesh=None, progress=True):
  """Samples `num_images` token grids with `method`; returns a Result with timings."""
  if num_images < 1:
    raise ValueError(f'--num_images={num_images} must be >= 1.')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size} must be >= 1.')
  labels = class_labels(num_images, bundle.model.num_classes, classes)
  fn, params, spec, mesh = build_decoder(bundle, method, sampling, options, mesh)
  sharding.check_divisible(batch_size, mesh)
  batch_size = min(batch_size, num_images + (-num_images) % mesh.shape['data'])

  def batch_inputs(start):
    lab = labels[start:start + batch_size]
    lab = np.pad(lab, (0, batch_size - len(lab)))  # padding rows are dropped afterwards
    return jnp.asarray(lab), image_keys(seed, start, batch_size)

  t0 = time.perf_counter()
  compiled = fn.lower(params, *batch_inputs(0)).compile()
  compile_seconds = time.perf_counter() - t0

  tokens, sample_passes = [], []
  target_passes = draft_passes = 0
  starts = range(0, num_images, batch_size)
  bar = tqdm(starts, desc=f'{method}', unit='batch', disable=not progress, leave=False)
  t0 = time.perf_counter()
  for start in bar:
    out, stats = compiled(params, *batch_inputs(start))
    keep = min(batch_size, num_images - start)
    tokens.append(np.asarray(out)[:keep])
    sample_passes.append(np.asarray(stats['sample_passes'])[:keep])
    target_passes += int(stats['target_passes'])
    draft_passes += int(stats['draft_passes'])
  run_seconds = time.perf_counter() - t0
  h, w = bundle.model.grid
  sample_passes = np.concatenate(sample_passes)
  stats = {
      'method': method, 'lossless': spec.lossless, 'num_images': num_images,
      'grid': [h, w], 'batch_size': batch_size, 'num_batches': len(starts),
      'target_passes': target_passes, 'draft_passes': draft_passes,
      'target_passes_per_batch': target_passes / len(starts),
      'tokens_per_pass': float(h * w / np.mean(sample_passes)),
      'compile_seconds': compile_seconds, 'run_seconds': run_seconds,
      'images_per_second': num_images / max(run_seconds, 1e-9),
      'sampling': dataclasses.asdict(sampling), 'options': dataclasses.asdict(options),
  }
  return Result(np.concatenate(tokens).reshape(-1, h, w), labels, stats)
