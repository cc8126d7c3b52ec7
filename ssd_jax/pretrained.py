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

BACKBONE = 'ar'  # the stage that holds the target model
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
  kw = dict(spec['heads'])
  kw['context'] = int(kw.get('context', 0))
  kw['chain'] = bool(kw.get('chain', False))
  return heads_lib.NeighbourHeads(**kw)


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
  # heads: a hidden state and token embedding (+ each head's context with `context`, the
  # tokens left of their targets with `chain`)
  k = module.num_horizontal + module.num_vertical
  ctx = (jnp.zeros((1, k, module.context, module.dim)),) * 2 if module.context else (None,) * 2
  left = (jnp.zeros((1, k, module.dim)),) if module.chain else ()
  return (jnp.zeros((1, module.dim)), jnp.zeros((1, module.dim))) + ctx + left


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
class Stage:
  """One trained stage: its module, parameters and results.json (None if absent)."""
  module: Any
  params: Any
  results: Optional[dict] = None


@dataclasses.dataclass(eq=False)
class Bundle:
  """Everything sampling needs from a run folder: the backbone (ar/), the tokenizer (when
  the run has one) and the further stages the chosen methods need, by stage name."""
  run_dir: str
  tokenizer: Optional[vq.VQTokenizer]
  tokenizer_params: Any
  model: transformer.Transformer
  params: Any
  class_names: tuple = ()
  stages: dict = dataclasses.field(default_factory=dict)  # name -> Stage (heads, ...)
  # Values derived from the stages, kept across decoders (codebook constants, compiled
  # decoders); see ssd_jax/decoding/codebook.py and engine.py.
  constants: dict = dataclasses.field(default_factory=dict)

  def stage(self, name):
    """The Stage called `name` ('ar', 'tokenizer' or one in `stages`), or None."""
    if name == 'ar':
      return Stage(self.model, self.params)
    if name == 'tokenizer':
      return Stage(self.tokenizer, self.tokenizer_params) if self.tokenizer else None
    return self.stages.get(name)

  @functools.cached_property
  def _decode(self):  # compiled once per bundle, reused by every decode_images call
    return jax.jit(lambda params, t: vq.unit_to_uint8(self.tokenizer.apply(
        {'params': params}, t, method=self.tokenizer.decode)))

  def decode_images(self, tokens, batch_size=256):
    """tokens [N, H, W] -> uint8 images [N, H * f, W * f, C] (f: the tokenizer's factor)."""
    if self.tokenizer is None:
      raise ValueError(f'{self.run_dir} has no tokenizer/ stage, so its tokens cannot be '
                       'decoded to images; keep the tokens (--tokens_out) instead.')
    tokens = np.asarray(tokens)
    return np.concatenate([np.asarray(self._decode(self.tokenizer_params,
                                                   tokens[i:i + batch_size]))
                           for i in range(0, len(tokens), batch_size)])


def _stage_command(stage, run_dir):
  return f'`python train.py --config=configs/{stage}.py --workdir={run_dir}`'


def check_run_dir(run_dir):
  """Refuses a checkpoint path that is not a run folder, before anything loads."""
  if os.path.isfile(run_dir):
    raise FileNotFoundError(f'--checkpoint={run_dir} is a file; pass the run folder that '
                            'holds tokenizer/ and ar/ (e.g. checkpoints/fmnist).')
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'--checkpoint={run_dir} does not exist; pass a run folder '
                            'holding tokenizer/ and ar/ (e.g. checkpoints/fmnist).')
  if not os.path.isdir(os.path.join(run_dir, 'ar')):
    raise FileNotFoundError(f'--checkpoint={run_dir} has no ar/ stage, so it is not a run '
                            'folder; train one with '
                            f'{_stage_command("ar", run_dir)} or pass checkpoints/fmnist.')


def load(run_dir=None, stages=()):
  """The Bundle of `run_dir` (default: the release) with the named further stages.

  A stage the caller needs but the run lacks is refused with the command that trains it.
  """
  run_dir = run_dir or DEFAULT_RELEASE
  check_run_dir(run_dir)
  stages = [s for s in dict.fromkeys(stages) if s not in ('ar', 'tokenizer')]
  for stage in stages:
    if stage not in MODULES:
      raise ValueError(f'unknown stage {stage!r}; stages are {", ".join(MODULES)}.')
    if not checkpoint.StageCheckpoints(os.path.join(run_dir, stage)).exists():
      raise FileNotFoundError(f'{run_dir} has no trained {stage}/ stage; train it with '
                              f'{_stage_command(stage, run_dir)} or pick another --method.')
  tok = tok_params = None
  if os.path.isdir(os.path.join(run_dir, 'tokenizer')):
    tok, tok_params, _ = load_stage(os.path.join(run_dir, 'tokenizer'), 'tokenizer')
  model, params, spec = load_stage(os.path.join(run_dir, 'ar'), 'ar')
  bundle = Bundle(run_dir, tok, tok_params, model, params, tuple(spec.get('class_names', ())))
  for stage in stages:
    stage_dir = os.path.join(run_dir, stage)
    module, stage_params, _ = load_stage(stage_dir, stage)
    results_path = os.path.join(stage_dir, 'results.json')
    results = checkpoint.load_json(results_path) if os.path.exists(results_path) else None
    bundle.stages[stage] = Stage(module, stage_params, results)
  check_consistent(bundle)
  return bundle


def check_consistent(bundle):
  """Refuses stages that do not fit the backbone (they come from different runs)."""
  if bundle.tokenizer is not None:
    codes = bundle.tokenizer.codebook_size
    if bundle.model.vocab_size != codes:
      raise ValueError(f'{bundle.run_dir}: the AR model has a vocabulary of '
                       f'{bundle.model.vocab_size} but the tokenizer has {codes} codes; the '
                       'stages come from different runs.')
  for name, stage in bundle.stages.items():
    width = getattr(stage.module, 'dim', None)
    if name in ('heads', 'hawk_draft') and width != bundle.model.dim:
      raise ValueError(f'{bundle.run_dir}: the {name} stage has width {width}, which does '
                       f'not fit a backbone of width {bundle.model.dim}; retrain it.')
