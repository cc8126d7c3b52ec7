"""Running a decoding method over many images: validation, batching, timing, sharding.

`generate` is what sample.py and bench.py call. The method is looked up in the registry
(ssd_jax/decoding/registry.py); this file names none. Its loop is compiled once per
(method, options, static sampling settings, mesh, batch shape) and kept on the bundle:
temperature and guidance scale are traced inputs, so a sweep over them reuses the loop.
Compile time is measured apart from run time, and the batches (the last one padded) all
reuse the compiled loop. Image i always gets the key fold_in(key(seed), i), so its tokens
do not depend on the batch size.
"""

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib


def class_labels(num_images, num_classes, classes=None):
  """Labels [num_images]: `classes` (a list) cycled, default all classes cycled."""
  classes = list(range(num_classes)) if not classes else list(classes)
  for c in classes:
    if not 0 <= c < num_classes:
      raise ValueError(f'class {c} is out of range: this model has classes 0..'
                       f'{num_classes - 1}.')
  return np.asarray([classes[i % len(classes)] for i in range(num_images)], np.int32)


def image_keys(seed, start, count):
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(start, start + count))


def resolve_options(method, options, bundle=None):
  """The method's Options from None (defaults), a dict of fields, or an Options instance,
  validated (against `bundle` when given)."""
  if options is None:
    options = method.make_options()
  elif isinstance(options, dict):
    options = method.make_options(**options)
  return method.validate(options, bundle)


def resolve_settings(entries):
  """[(label, Method, options)] of (method name, {option: value}) pairs, each validated;
  repeated labels once. The label names the method and the options given."""
  out = []
  for entry in entries:
    if len(entry) != 2 or not isinstance(entry[1], dict):
      raise ValueError(f'config.settings entry {entry!r} is not (method, {{option: value}}).')
    name, values = entry
    method = registry.get(name)
    options = resolve_options(method, dict(values))
    label = ' '.join([name] + [f'{k}={v}' for k, v in values.items()])
    if label not in [l for l, _, _ in out]:
      out.append((label, method, options))
  return out


def check_stages(bundle, method):
  for stage in method.needs:
    if bundle.stage(stage) is None:
      raise ValueError(f'method {method.name!r} needs the {stage}/ stage, which '
                       f'{bundle.run_dir} lacks; train it with `python train.py '
                       f'--config=configs/{stage}.py` or pick another --method.')


def param_shardings(bundle, params, mesh, rules):
  """Shardings of a method's params {stage: tree} on `mesh`, checked to divide evenly."""
  out = {}
  for name, tree in params.items():
    module = bundle.stage(name).module
    if getattr(module, 'num_heads', None):
      sharding.check_heads_divisible(
          module.num_heads, mesh, rules, flag='--mesh_model',
          what='the model' if name == pretrained.BACKBONE else f'the {name} stage')
    boxed = pretrained.boxed_abstract_params(name, module)
    if jax.tree.structure(sharding.strip_boxes(boxed)) != jax.tree.structure(tree):
      raise ValueError(f'{bundle.run_dir}: the {name} parameters do not match the module '
                       'that model.json describes; the stage folder is damaged.')
    sharding.check_params_divisible(
        boxed, mesh, rules, prefix=f'{name}/',
        fix='Choose --mesh_model (--config.mesh.model) dividing it, or map that axis to '
            'None in the logical axis rules.')
    out[name] = sharding.logical_shardings(boxed, mesh, rules)
  return out


@dataclasses.dataclass
class Decoder:
  """A method's loop, jitted for one mesh: decoder(labels, keys) -> (tokens, stats)."""
  method: registry.Method
  options: Any
  sampling: sampling_lib.Sampling
  mesh: Any
  params: dict          # {stage: params} placed on the mesh
  jitted: Any           # fn(params, labels, keys, traced sampling values)
  compiled: dict = dataclasses.field(default_factory=dict)  # batch size -> executable

  def inputs(self, labels, keys, sampling=None):
    """The jitted function's arguments for host labels [B] and keys [B]."""
    values = (sampling or self.sampling).traced_values()
    return (self.params, sharding.put_batch(np.asarray(labels), self.mesh),
            sharding.put_batch(keys, self.mesh),
            sharding.put(values, sharding.replicated(self.mesh)))

  def compile(self, labels, keys):
    """The executable for this batch size (compiled once) and the seconds it took."""
    batch = len(labels)
    if batch in self.compiled:
      return self.compiled[batch], 0.0
    t0 = time.perf_counter()
    self.compiled[batch] = self.jitted.lower(*self.inputs(labels, keys)).compile()
    return self.compiled[batch], time.perf_counter() - t0

  def __call__(self, labels, keys, sampling=None):
    return self.compile(labels, keys)[0](*self.inputs(labels, keys, sampling))


DTYPES = ('float32', 'bfloat16')


def cast(params, dtype):
  """Floating-point leaves of a params tree in `dtype` (ints, e.g. codebooks' ids, stay)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
                      else x, params)


def build_decoder(bundle, method, sampling, options=None, mesh=None, rules=None,
                  dtype='float32'):
  """The Decoder of `method` (a name) for `bundle`, validated before anything compiles.

  dtype: of parameters, activations and the KV cache ('float32' or 'bfloat16'); every
  stage a method uses runs in it, so a draft's q and the target's p come from the same
  precision and the exact rules stay exact (probabilities are always float32).

  Labels and keys are split over 'data'; parameters by the logical axis `rules` (default
  sharding.DEFAULT_RULES: heads, MLP and vocabulary over 'model'). Decoders are kept on
  the bundle: the same method, options, static sampling settings and mesh reuse one.
  """
  spec = registry.get(method)
  if dtype not in DTYPES:
    raise ValueError(f'--dtype={dtype} must be one of {", ".join(DTYPES)}.')
  check_stages(bundle, spec)  # before the options, whose checks may read the stages
  options = resolve_options(spec, options, bundle)
  sampling.validate(bundle.model.vocab_size)
  mesh = mesh or sharding.make_mesh(-1, 1)
  rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
  key = (method, options, sampling.static_key(), mesh, rules, dtype)
  cache = bundle.constants.setdefault('decoders', {})
  if key in cache:
    return dataclasses.replace(cache[key], sampling=sampling)
  # The tokenizer's codebook enters as a constant (decoding/codebook.py), not a parameter.
  stages = [pretrained.BACKBONE] + [n for n in spec.needs if n != 'tokenizer']
  params = {name: bundle.stage(name).params for name in dict.fromkeys(stages)}
  shardings = param_shardings(bundle, params, mesh, rules)
  params = sharding.put(cast(params, jnp.dtype(dtype)), shardings)
  batch = sharding.batch_sharding(mesh)

  def on_mesh(params, labels, keys, values):
    # Model code constrains activations by logical names (act_batch, ...), which resolve
    # only under the rules and a mesh; jax.set_mesh cannot be entered under jit, the
    # abstract mesh can. The builder runs here, so temperature and guidance are traced.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      target = target_lib.Target(bundle.model, sampling.processing(values), jnp.dtype(dtype))
      return spec.build(bundle, target, options)(params, labels, keys)

  jitted = jax.jit(on_mesh, in_shardings=(shardings, batch, batch, sharding.replicated(mesh)),
                   out_shardings=(sharding.batch_sharding(mesh, 2), None))
  cache[key] = Decoder(spec, options, sampling, mesh, params, jitted)
  return cache[key]


@dataclasses.dataclass
class Result:
  tokens: np.ndarray      # [num_images, H, W] int32
  labels: np.ndarray      # [num_images]
  stats: dict


def generate(bundle, method, sampling, num_images, batch_size, classes=None, seed=0,
             options=None, mesh=None, progress=True, rules=None, dtype='float32'):
  """Samples `num_images` token grids with `method`; returns a Result with timings.

  `options`: the method's Options, a dict of its fields, or None (its defaults). With
  several processes every process calls this with the same arguments and gets all the
  tokens.
  """
  if num_images < 1:
    raise ValueError(f'--num_images={num_images} must be >= 1.')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size} must be >= 1.')
  labels = class_labels(num_images, bundle.model.num_classes, classes)
  mesh = mesh or sharding.make_mesh(-1, 1)
  sharding.check_divisible(batch_size, mesh)  # before parameters move to the mesh
  decoder = build_decoder(bundle, method, sampling, options, mesh, rules, dtype)
  batch_size = min(batch_size, num_images + (-num_images) % mesh.shape['data'])

  def batch_inputs(start):
    lab = labels[start:start + batch_size]
    lab = np.pad(lab, (0, batch_size - len(lab)))  # padding rows are dropped afterwards
    return lab, image_keys(seed, start, batch_size)

  compiled, compile_seconds = decoder.compile(*batch_inputs(0))
  tokens, sample_passes = [], []
  target_passes = draft_passes = 0
  starts = range(0, num_images, batch_size)
  bar = tqdm(starts, desc=f'{method}', unit='batch', leave=False,
             disable=not progress or jax.process_index() != 0)
  t0 = time.perf_counter()
  for start in bar:
    out, stats = compiled(*decoder.inputs(*batch_inputs(start)))
    keep = min(batch_size, num_images - start)
    tokens.append(sharding.to_host(out)[:keep])
    sample_passes.append(sharding.to_host(stats['sample_passes'])[:keep])
    target_passes += int(stats['target_passes'])
    draft_passes += int(stats['draft_passes'])
  run_seconds = time.perf_counter() - t0
  h, w = bundle.model.grid
  sample_passes = np.concatenate(sample_passes)
  stats = {
      'method': method, 'lossless': decoder.method.lossless, 'num_images': num_images,
      'grid': [h, w], 'batch_size': batch_size, 'num_batches': len(starts),
      'target_passes': target_passes, 'draft_passes': draft_passes,
      'target_passes_per_batch': target_passes / len(starts),
      'tokens_per_pass': float(h * w / np.mean(sample_passes)),
      'compile_seconds': compile_seconds, 'run_seconds': run_seconds,
      'images_per_second': num_images / max(run_seconds, 1e-9),
      'sampling': dataclasses.asdict(sampling), 'dtype': dtype,
      'options': dataclasses.asdict(decoder.options),
  }
  return Result(np.concatenate(tokens).reshape(-1, h, w), labels, stats)
