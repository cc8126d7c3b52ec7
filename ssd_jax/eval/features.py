"""Feature extractors for FID: our classifier by default, anything else by plug-in.

An extractor is any callable `images_uint8 [N, H, W, C] -> features [N, F]` (numpy or jax
arrays). bench.py takes one as `--features=SPEC [--features_path=PATH]`:

  classifier              the penultimate layer of our classifier stage (the default);
  pkg.module:factory      an importable module;
  path/to/file.py:factory a Python file on disk.

`factory(PATH)` (or `factory()` without --features_path) returns the extractor. With
Inception weights on disk, for example (the factory resizes and converts as its network
needs; FID values are comparable only between runs with the same extractor):

  # my_inception.py
  def make(weights_path):
    net = load_inception(weights_path)          # your port: Flax, Keras, torch, ...
    def features(images_uint8):                 # [N, 28, 28, 1] uint8
      rgb = np.repeat(resize(images_uint8, 299), 3, axis=-1)
      return net.pool3(rgb)                     # [N, 2048]
    return features

  python bench.py --features=my_inception.py:make --features_path=/data/inception.npz
"""

import importlib
import importlib.util
import os

import jax
import numpy as np

from ssd_jax import pretrained
from ssd_jax.models import classifier as classifier_lib


def batched(fn, x, batch_size):
  """fn over x in fixed-size batches (the last one padded: one compilation for all)."""
  x = np.asarray(x)
  out = []
  for i in range(0, len(x), batch_size):
    chunk = x[i:i + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, axis=0)])
    out.append(np.asarray(fn(chunk))[:batch_size - pad])
  return np.concatenate(out)


class ClassifierExtractor:
  """Our classifier stage: `__call__` gives its features, `predict` its class ids."""
  name = 'classifier'

  def __init__(self, stage_dir, batch_size=500):
    self.stage_dir = stage_dir
    self.module, self.params, spec = pretrained.load_stage(stage_dir, 'classifier')
    self.class_names = tuple(spec.get('class_names', ()))
    self.batch_size = batch_size
    apply = lambda method: jax.jit(
        lambda x: self.module.apply({'params': self.params}, x, method=method))
    self._features = apply(self.module.features)
    self._logits = apply(self.module.__call__)

  def __call__(self, images_uint8):  # [N, S, S, C] uint8 -> [N, feature_dim]
    return batched(self._features, images_uint8, self.batch_size)

  def predict(self, images_uint8):  # [N, S, S, C] uint8 -> [N] class ids
    return classifier_lib.predict(batched(self._logits, images_uint8, self.batch_size))


def _import(target):
  if target.endswith('.py'):
    if not os.path.exists(target):
      raise FileNotFoundError(f'--features: {target} does not exist.')
    spec = importlib.util.spec_from_file_location(
        os.path.splitext(os.path.basename(target))[0], target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
  return importlib.import_module(target)


def load_extractor(spec, path=None, classifier=None):
  """The extractor named by `spec` (see the module docstring); `classifier` is reused."""
  if spec in ('', 'classifier'):
    if classifier is None:
      raise ValueError('--features=classifier needs a trained classifier stage.')
    return classifier
  if ':' not in spec:
    raise ValueError(f'--features={spec!r}: use "classifier", "pkg.module:factory" or '
                     '"path/to/file.py:factory".')
  target, factory_name = spec.rsplit(':', 1)
  factory = getattr(_import(target), factory_name, None)
  if not callable(factory):
    raise ValueError(f'--features={spec!r}: {target} has no callable {factory_name!r}.')
  fn = factory(path) if path else factory()
  if not callable(fn):
    raise ValueError(f'--features={spec!r}: {factory_name}() must return a callable '
                     'images_uint8 [N, H, W, C] -> features [N, F].')
  return fn


def extract(extractor, images_uint8):
  """Runs an extractor and checks that it returned one feature row per image."""
  feats = np.asarray(extractor(images_uint8))
  if feats.ndim != 2 or len(feats) != len(images_uint8):
    raise ValueError(f'the feature extractor returned shape {feats.shape} for '
                     f'{len(images_uint8)} images; it must return [N, F].')
  return feats
