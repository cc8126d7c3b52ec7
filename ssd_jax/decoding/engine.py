"""Running a decoding method over many images: validation, batching, timing, statistics.

`generate` is what sample.py and bench.py call. A method is looked up in METHODS by name
and compiled once (static shapes): compile time is measured apart from run time, and the
batches (the last one padded) all reuse the compiled loop. Image i always gets the key
fold_in(key(seed), i), so its tokens do not depend on the batch size.
"""

import dataclasses
import functools
import time
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import acceptance
from ssd_jax.decoding import ar
from ssd_jax.decoding import drafts
from ssd_jax.decoding import hawk
from ssd_jax.decoding import mulo
from ssd_jax.decoding import sjd
from ssd_jax.decoding import speculative
from ssd_jax.decoding import ssd
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding import zipar


@dataclasses.dataclass(frozen=True)
class Options:
  """Knobs of the methods (each method reads the ones it has)."""
  draft_len: int = 4           # speculative / ssd row 0: drafts verified per pass
  ssd_rounds: int = 1          # ssd: verify-and-correct passes per row (r)
  horizontal_first: int = 0    # drafts from horizontal heads before vertical; 0 = auto
  sjd_window: int = 16         # sjd / gsd: draft window L after the committed prefix
  sjd_init: str = 'random'     # sjd / gsd: new window positions: random, left or upper copy
  gsd_rank_window: int = 7     # gsd: cluster candidates within +-this many ranks of p
  gsd_prob_threshold: float = 0.15  # gsd: ... with |p(v) - p(x)| below this
  # gsd: ... and squared codebook distance below this. Codes are unit vectors; on an
  # earlier training of the fmnist tokenizer 0.05 kept ~12 of 512 codes near each code,
  # whose decoded patches differ by ~29 dB PSNR (the tokenizer's own: 32 dB); the paper's
  # 0.5 (on its model's token embeddings) admitted 30% of that codebook, at ~16 dB.
  gsd_dist_threshold: float = 0.05
  lantern_k: int = 32          # lantern: latent neighbours per code (~6% of 512 codes,
                               # as the paper's 1000 of 16384)
  lantern_delta: float = 0.1   # lantern: target mass pooled over them, at most (paper's)
  zipar_window: int = 0        # zipar: row r+1 starts when row r has this many; 0 = W/2
  mulo_tau: float = 0.3        # mulo: keep a draft if p(it + its neighbours) >= this
  mulo_k: int = 8              # mulo: codebook neighbours pooled with the draft token
  mulo_radius: int = 1         # mulo: rejected positions grow by this Chebyshev radius
  hawk_draft_len: int = 4      # hawk: horizontal chain length K (K + K(K+1)/2 drafts)
  mulo_lanes: int = 8          # mulo: islands resampled at once; 0 = all there can be

  def validate(self):
    if self.draft_len < 1:
      raise ValueError(f'--draft_len={self.draft_len} must be >= 1.')
    if self.ssd_rounds < 0:
      raise ValueError(f'--ssd_rounds={self.ssd_rounds} must be >= 0.')
    if self.horizontal_first < 0:
      raise ValueError(f'--horizontal_first={self.horizontal_first} must be >= 0 '
                       '(0 = choose from the heads\' measured acceptance).')
    if self.sjd_window < 1:
      raise ValueError(f'--sjd_window={self.sjd_window} must be >= 1.')
    if self.sjd_init not in sjd.INITS:
      raise ValueError(f'--sjd_init={self.sjd_init!r} must be one of '
                       f'{", ".join(sjd.INITS)}.')
    if self.gsd_rank_window < 0:
      raise ValueError(f'--gsd_rank_window={self.gsd_rank_window} must be >= 0 '
                       '(0 = no cluster: sjd).')
    if not 0 <= self.gsd_prob_threshold <= 1:
      raise ValueError(f'--gsd_prob_threshold={self.gsd_prob_threshold} must be in [0, 1] '
                       '(0 = no cluster: sjd).')
    if not 0 <= self.gsd_dist_threshold <= 4:
      raise ValueError(f'--gsd_dist_threshold={self.gsd_dist_threshold} must be in [0, 4] '
                       '(a squared distance between unit codes; 0 = no cluster: sjd).')
    if self.lantern_k < 1:
      raise ValueError(f'--lantern_k={self.lantern_k} must be >= 1.')
    if not 0 <= self.lantern_delta <= 1:
      raise ValueError(f'--lantern_delta={self.lantern_delta} must be in [0, 1] (a '
                       'probability mass; 0 = exact speculative decoding).')
    if self.zipar_window < 0:
      raise ValueError(f'--zipar_window={self.zipar_window} must be >= 0 (0 = half the '
                       'grid width).')
    if not 0 <= self.mulo_tau < float('inf'):
      raise ValueError(f'--mulo_tau={self.mulo_tau} must be >= 0 (a probability mass; 0 = '
                       'keep the whole draft, above 1 = resample every position).')
    if self.mulo_k < 0:
      raise ValueError(f'--mulo_k={self.mulo_k} must be >= 0 (0 = the draft token alone).')
    if self.mulo_radius < 0:
      raise ValueError(f'--mulo_radius={self.mulo_radius} must be >= 0 (0 = resample only '
                       'the rejected positions).')
    if not 1 <= self.hawk_draft_len <= 8:
      raise ValueError(f'--hawk_draft_len={self.hawk_draft_len} must be in [1, 8] (the '
                       'verified tree grows as K + K(K+1)/2).')
    if self.mulo_lanes < 0:
      raise ValueError(f'--mulo_lanes={self.mulo_lanes} must be >= 0 (0 = as many islands '
                       'as the grid can hold).')
    return self


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  lossless: bool     # exact: greedy equals AR, sampled distribution equals the target's
  needs_heads: bool
  build: Callable    # (bundle, target, options) -> fn(params, labels, keys) -> (tokens, stats)
  summary: str


def _params(bundle):
  return {'backbone': bundle.params, 'heads': bundle.heads_params,
          'mulo_draft': bundle.mulo_draft_params,
          'mulo_upsampler': bundle.mulo_upsampler_params, 'hawk': bundle.hawk_params}


# The module behind each entry of _params (Bundle attribute, stage that builds it): its
# parameters are split by the logical axis rules. An entry not listed here is replicated.
PARAM_MODULES = {'backbone': ('model', 'ar'), 'heads': ('heads', 'heads'),
                 'mulo_draft': ('mulo_draft', 'mulo_draft'),
                 'mulo_upsampler': ('mulo_upsampler', 'mulo_upsampler'),
                 'hawk': ('hawk', 'hawk_draft')}


def param_shardings(bundle, params, mesh, rules):
  """Shardings of a method's params dict on `mesh`, checked to divide every dimension."""
  # The qkv kernel's 'heads' axis is heads * head_dim * 3 wide, so the check of parameter
  # shapes below would let a split through heads.
  heads = bundle.model.num_heads
  devices = sharding.axis_devices(mesh, rules, 'heads')
  if heads % devices:
    divisors = [str(d) for d in range(1, heads + 1) if heads % d == 0]
    choices = ' or '.join([', '.join(divisors[:-1]), divisors[-1]] if len(divisors) > 1
                          else divisors)
    raise ValueError(
        f'the model has {heads} attention heads, which the mesh splits over {devices} '
        f'devices: not divisible. Choose --mesh_model (--config.mesh.model) {choices}, or '
        "map 'heads' to None in the logical axis rules.")
  out = {}
  for key, tree in params.items():
    attr, stage = PARAM_MODULES.get(key, (None, None))
    module = getattr(bundle, attr) if attr else None
    shardings = None
    if module is not None and tree is not None:
      boxed = pretrained.boxed_abstract_params(stage, module)
      if jax.tree.structure(sharding.strip_boxes(boxed)) == jax.tree.structure(tree):
        sharding.check_params_divisible(
            boxed, mesh, rules, prefix=f'{key}/',
            fix='Choose --mesh_model (--config.mesh.model) dividing it, or map that axis to '
                'None in the logical axis rules.')
        shardings = sharding.logical_shardings(boxed, mesh, rules)
    out[key] = shardings or jax.tree.map(lambda _: sharding.replicated(mesh), tree)
  return out


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


def codebook(bundle):
  """The tokenizer's unit-norm codes [V, d], the latent space GSD and LANTERN measure."""
  return bundle.tokenizer.apply({'params': bundle.tokenizer_params},
                                method=bundle.tokenizer.codes)


def _build_sjd(bundle, target, options, rule=acceptance.accept_exact):
  del bundle
  return lambda params, labels, keys: sjd.decode_sjd(
      target, params['backbone'], labels, keys, options.sjd_window, options.sjd_init, rule)


def _build_gsd(bundle, target, options):
  rule = functools.partial(
      acceptance.accept_grouped, codes=codebook(bundle),
      rank_window=options.gsd_rank_window, prob_threshold=options.gsd_prob_threshold,
      dist_threshold=options.gsd_dist_threshold)
  return _build_sjd(bundle, target, options, rule)


def _build_lantern(bundle, target, options):
  vocab = bundle.model.vocab_size
  if options.lantern_k >= vocab:
    raise ValueError(f'--lantern_k={options.lantern_k} must be < {vocab} (the codebook '
                     'size: the neighbours are the other codes).')
  rule = functools.partial(
      acceptance.accept_relaxed, delta=options.lantern_delta,
      neighbours=acceptance.latent_neighbours(codebook(bundle), options.lantern_k))
  drafter = _drafter(bundle, target, options)
  return lambda params, labels, keys: speculative.decode_speculative(
      target, drafter, params, labels, keys, options.draft_len, rule=rule)


def _zipar_window(bundle, options):
  width = bundle.model.grid[1]
  window = options.zipar_window or (width + 1) // 2
  if window > width:
    raise ValueError(f'--zipar_window={window} must be <= {width} (the grid width; '
                     f'{width} = plain AR).')
  return window


def _build_zipar(bundle, target, options):
  window = _zipar_window(bundle, options)
  return lambda params, labels, keys: zipar.decode_zipar(
      target, params['backbone'], labels, keys, window)


def _build_hawk(bundle, target, options):
  if bundle.hawk is None:
    raise ValueError(f'method \'hawk\' drafts with the Hawk draft model, but '
                     f'{bundle.run_dir} has no hawk_draft/ stage; train it with '
                     '`python train.py --config=configs/hawk_draft.py` or pick another '
                     '--method.')
  return hawk.HawkDecoder(target, bundle.hawk, options.hawk_draft_len).decode


METHODS = {
    'ar': Method('ar', True, False, _build_ar, 'plain raster decoding (baseline)'),
    'speculative': Method('speculative', True, True, _build_speculative,
                          'exact speculative decoding, neighbour-head drafts (lossless)'),
    'ssd': Method('ssd', False, True, _build_ssd,
                  'SSD row schedule: vertical row drafts, r verify rounds (LOSSY)'),
    'sjd': Method('sjd', True, False, _build_sjd,
                  'speculative Jacobi decoding: the model drafts its next window (lossless)'),
    'gsd': Method('gsd', False, False, _build_gsd,
                  'grouped speculative decoding: sjd accepting clusters of similar tokens '
                  '(LOSSY)'),
    'lantern': Method('lantern', False, True, _build_lantern,
                      'LANTERN relaxed acceptance over latent neighbours, head drafts '
                      '(LOSSY)'),
    'zipar': Method('zipar', False, False, _build_zipar,
                    'ZipAR multi-row front: next row starts after a window (LOSSY)'),
    'hawk': Method('hawk', True, False, _build_hawk,
                   'Hawk: 2D local-attention draft model, horizontal + vertical drafts '
                   'verified as a tree (lossless)'),
    'mulo': Method('mulo', False, False, mulo.build,
                   'MuLo-SD: low-res drafter + upsampler, one verify pass, local '
                   'resampling of rejected islands (LOSSY)'),
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


def build_decoder(bundle, method, sampling, options=Options(), mesh=None, rules=None):
  """(jitted fn(params, labels, keys), params, method spec, mesh), placed on `mesh`.

  Labels and keys are split over 'data'; parameters by the logical axis `rules` (default
  sharding.DEFAULT_RULES: heads, MLP and vocabulary over 'model').
  """
  spec = get_method(method)
  sampling.validate(bundle.model.vocab_size)
  options.validate()
  if spec.needs_heads and bundle.heads is None:
    raise ValueError(f'method {method!r} drafts with neighbour heads, but {bundle.run_dir} '
                     'has no heads/ stage; train it with configs/heads.py or use --method=ar.')
  target = target_lib.Target(bundle.model, sampling)
  fn = spec.build(bundle, target, options)
  mesh = mesh or sharding.make_mesh(-1, 1)
  rules = sharding.DEFAULT_RULES if rules is None else tuple(rules)
  batch = sharding.batch_sharding(mesh)
  params = _params(bundle)
  shardings = param_shardings(bundle, params, mesh, rules)
  params = sharding.put(params, shardings)

  def on_mesh(params, labels, keys):
    # Model code constrains activations by logical names (act_batch, ...), which resolve
    # only under the rules and a mesh; jax.set_mesh cannot be entered under jit, the
    # abstract mesh can.
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(params, labels, keys)

  jitted = jax.jit(on_mesh, in_shardings=(shardings, batch, batch),
                   out_shardings=(sharding.batch_sharding(mesh, 2), None))
  return jitted, params, spec, mesh


def generate(bundle, method, sampling, num_images, batch_size, classes=None, seed=0,
             options=Options(), mesh=None, progress=True, rules=None):
  """Samples `num_images` token grids with `method`; returns a Result with timings.

  With several processes every process calls this with the same arguments and gets all
  the tokens.
  """
  if num_images < 1:
    raise ValueError(f'--num_images={num_images} must be >= 1.')
  if batch_size < 1:
    raise ValueError(f'--batch_size={batch_size} must be >= 1.')
  labels = class_labels(num_images, bundle.model.num_classes, classes)
  mesh = mesh or sharding.make_mesh(-1, 1)
  sharding.check_divisible(batch_size, mesh)  # before parameters move to the mesh
  fn, params, spec, mesh = build_decoder(bundle, method, sampling, options, mesh, rules)
  batch_size = min(batch_size, num_images + (-num_images) % mesh.shape['data'])

  def batch_inputs(start):
    lab = labels[start:start + batch_size]
    lab = np.pad(lab, (0, batch_size - len(lab)))  # padding rows are dropped afterwards
    return (sharding.put_batch(lab, mesh),
            sharding.put_batch(image_keys(seed, start, batch_size), mesh))

  t0 = time.perf_counter()
  compiled = fn.lower(params, *batch_inputs(0)).compile()
  compile_seconds = time.perf_counter() - t0

  tokens, sample_passes = [], []
  target_passes = draft_passes = 0
  starts = range(0, num_images, batch_size)
  bar = tqdm(starts, desc=f'{method}', unit='batch', leave=False,
             disable=not progress or jax.process_index() != 0)
  t0 = time.perf_counter()
  for start in bar:
    out, stats = compiled(params, *batch_inputs(start))
    keep = min(batch_size, num_images - start)
    tokens.append(sharding.to_host(out)[:keep])
    sample_passes.append(sharding.to_host(stats['sample_passes'])[:keep])
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
