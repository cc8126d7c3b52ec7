"""Loading trained stages (a run folder such as the release in checkpoints/fmnist).

A run folder holds one subfolder per stage, each with `model.json` (what is needed to
rebuild the module) and Orbax checkpoints. Parameters are restored against the abstract
shapes of the module that model.json describes, so a mismatch is refused by name.
"""

import dataclasses
import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ssd_jax import sharding
from ssd_jax.models import classifier as classifier_lib
from ssd_jax.models import hawk as hawk_lib
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import mulo as mulo_lib
from ssd_jax.models import transformer
from ssd_jax.models import vq
from ssd_jax.models import vq16
from ssd_jax.training import checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RELEASE = os.path.join(REPO_ROOT, 'checkpoints', 'fmnist')


def tokenizer_module(spec):
  kw = dict(spec['tokenizer'])
  if kw.pop('kind', 'vq') == 'vq16':  # LlamaGen's VQ-16 (ssd_jax/importers/llamagen.py)
    return vq16.VQ16Tokenizer(**dict(kw, channel_mult=tuple(kw['channel_mult'])))
  return vq.VQTokenizer(**kw)


def transformer_module(spec):
  kw = dict(spec['transformer'])
  kw['grid'] = tuple(kw['grid'])
  return transformer.Transformer(**kw)


def heads_module(spec):
  return heads_lib.NeighbourHeads(**spec['heads'])


def hawk_module(spec):
  kw = dict(spec['hawk_draft'])
  kw['grid'] = tuple(kw['grid'])
  return hawk_lib.HawkDrafter(**kw)


def classifier_module(spec):
  return classifier_lib.Classifier(**spec['classifier'])


MODULES = {'tokenizer': tokenizer_module, 'ar': transformer_module, 'heads': heads_module,
           'classifier': classifier_module, 'hawk_draft': hawk_module,
           'mulo_draft': transformer_module, 'mulo_upsampler': mulo_lib.upsampler_module}


def abstract_params(module, spec_stage, init_args):
  boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *init_args)['params'])
  return sharding.strip_boxes(boxed)


def init_args(stage, module):
  """Dummy inputs that make `module.init` build every parameter."""
  if stage == 'tokenizer':
    return (jnp.zeros((1, module.factor * 2, module.factor * 2, module.image_channels)),)
  if stage in ('ar', 'mulo_draft'):
    return (jnp.zeros((1, module.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32))
  if stage == 'mulo_upsampler':
    return mulo_lib.upsampler_init_args(module)
  if stage == 'hawk_draft':  # hidden states and token embeddings of a whole grid
    n = module.grid[0] * module.grid[1]
    return (jnp.zeros((1, n, module.dim)), jnp.zeros((1, n, module.dim)))
  if stage == 'classifier':
    s = module.image_size
    return (jnp.zeros((1, s, s, module.image_channels), jnp.uint8),)
  return (jnp.zeros((1, module.dim)), jnp.zeros((1, module.dim)))


def boxed_abstract_params(stage, module):
  """Abstract parameters still in their LogicallyPartitioned boxes (the logical axis names)."""
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), *init_args(stage, module))['params'])


def param_shardings(stage, module, mesh, rules=None):
  """NamedShardings of a stage's parameters on `mesh` by the logical axis rules."""
  return sharding.logical_shardings(boxed_abstract_params(stage, module), mesh,
                                    sharding.DEFAULT_RULES if rules is None else rules)


def load_stage(stage_dir, stage, shardings=None, mesh=None, rules=None):
  """(module, params, spec) of the newest checkpoint in `stage_dir`.

  Parameters land on `shardings` (a tree), else on `mesh` by the logical `rules`, else on
  the first device; the checkpoint may have been saved on any mesh.
  """
  spec_path = os.path.join(stage_dir, 'model.json')
  if not os.path.exists(spec_path):
    raise FileNotFoundError(
        f'{spec_path} not found: {stage_dir} is not a trained {stage!r} stage. Train it with '
        f'`python train.py --config=configs/{stage}.py --workdir=...` or pass the run folder '
        'that holds it.')
  spec = checkpoint.load_json(spec_path)
  module = MODULES[stage](spec)
  target = abstract_params(module, spec, init_args(stage, module))
  if shardings is None and mesh is not None:
    shardings = param_shardings(stage, module, mesh, rules)
  if shardings is None:
    # An explicit placement lets a checkpoint saved on another topology (8 devices, a pod)
    # load here; without one Orbax insists on the saved device layout.
    # (This process's own first device: jax.devices()[0] belongs to process 0.)
    shardings = jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.local_devices()[0]), target)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        target, shardings)
  ckpts = checkpoint.StageCheckpoints(stage_dir)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpts.directory}.')
  params = ckpts.restore(step, {'params': target})['params']
  return module, params, spec


@dataclasses.dataclass
class Bundle:
  """Everything sampling needs from a run folder."""
  run_dir: str
  tokenizer: vq.VQTokenizer
  tokenizer_params: Any
  model: transformer.Transformer
  params: Any
  heads: Optional[heads_lib.NeighbourHeads] = None
  heads_params: Any = None
  class_names: tuple = ()
  heads_results: Optional[dict] = None  # heads/results.json: per-head acceptance
  mulo_draft: Optional[transformer.Transformer] = None  # MuLo-SD's low-res drafter
  mulo_draft_params: Any = None
  mulo_upsampler: Optional[mulo_lib.Upsampler] = None  # ... and its upsampler
  mulo_upsampler_params: Any = None
  hawk: Optional[hawk_lib.HawkDrafter] = None  # Hawk's 2D draft model (hawk_draft/)
  hawk_params: Any = None

  @functools.cached_property
  def _decode(self):  # compiled once per bundle, reused by every decode_images call
    return jax.jit(lambda params, t: vq.unit_to_uint8(self.tokenizer.apply(
        {'params': params}, t, method=self.tokenizer.decode)))

  def decode_images(self, tokens, batch_size=256):
    """tokens [N, H, W] -> uint8 images [N, 28, 28, C]."""
    tokens = np.asarray(tokens)
    return np.concatenate([np.asarray(self._decode(self.tokenizer_params,
                                                   tokens[i:i + batch_size]))
                           for i in range(0, len(tokens), batch_size)])


def load(run_dir=None, need_heads=False):
  run_dir = run_dir or DEFAULT_RELEASE
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'checkpoint folder {run_dir} does not exist; pass --checkpoint '
                            'with a run folder holding tokenizer/ and ar/ (and heads/).')
  tok, tok_params, _ = load_stage(os.path.join(run_dir, 'tokenizer'), 'tokenizer')
  model, params, spec = load_stage(os.path.join(run_dir, 'ar'), 'ar')
  heads_dir = os.path.join(run_dir, 'heads')
  heads = heads_params = heads_results = None
  if os.path.isdir(heads_dir):
    heads, heads_params, _ = load_stage(heads_dir, 'heads')
    results_path = os.path.join(heads_dir, 'results.json')
    if os.path.exists(results_path):
      heads_results = checkpoint.load_json(results_path)
  elif need_heads:
    raise FileNotFoundError(f'{heads_dir} not found: this method drafts with neighbour heads; '
                            'train them with `python train.py --config=configs/heads.py`.')
  bundle = Bundle(run_dir, tok, tok_params, model, params, heads, heads_params,
                  tuple(spec.get('class_names', ())), heads_results)
  for stage in ('mulo_draft', 'mulo_upsampler'):  # MuLo-SD's, once they have a checkpoint
    stage_dir = os.path.join(run_dir, stage)
    if checkpoint.StageCheckpoints(stage_dir).exists():
      module, stage_params, _ = load_stage(stage_dir, stage)
      setattr(bundle, stage, module)
      setattr(bundle, stage + '_params', stage_params)
  hawk_dir = os.path.join(run_dir, 'hawk_draft')
  if os.path.isdir(hawk_dir):
    bundle.hawk, bundle.hawk_params, _ = load_stage(hawk_dir, 'hawk_draft')
  check_consistent(bundle)
  return bundle


def check_consistent(bundle):
  grid = (bundle.tokenizer_params['codebook'].shape[0],)
  if bundle.model.vocab_size != grid[0]:
    raise ValueError(f'{bundle.run_dir}: the AR model has a vocabulary of '
                     f'{bundle.model.vocab_size} but the tokenizer has {grid[0]} codes; the '
                     'stages come from different runs.')
  if bundle.heads is not None and bundle.heads.dim != bundle.model.dim:
    raise ValueError(f'{bundle.run_dir}: heads of width {bundle.heads.dim} do not fit a '
                     f'backbone of width {bundle.model.dim}; retrain the heads stage.')
