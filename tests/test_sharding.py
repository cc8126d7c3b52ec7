"""Sharding (issue 7) on the 8 fake CPU devices of conftest.py.

Decoding: with the batch split over 'data' every method gives the tokens of one device,
greedy and sampled; with the parameters split over 'model' the logits agree within
LOGIT_TOL and a token that differs is a near-tie of the target. Training: a step of the
ar stage gives the parameters of one device (PARAM_TOL) on meshes (8, 1) and (4, 2), one of
the heads stage on (4, 2). Checkpoints saved on one device restore sharded on eight and back. Meshes that do
not divide the batch or the heads are refused before anything compiles.
"""

import concurrent.futures
import dataclasses
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar as ar_config
from configs import heads as heads_config
from ssd_jax import pretrained
from ssd_jax import sample_job
from ssd_jax import sharding
from ssd_jax.data import pipeline
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.models import hawk as hawk_model
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import mulo as mulo_models
from ssd_jax.models import vq
from ssd_jax.training import ar_stage
from ssd_jax.training import checkpoint
from ssd_jax.training import heads_stage
from ssd_jax.training import loop
import helpers  # pylint: disable=g-bad-import-order
from test_data import write_fashion_idx  # pylint: disable=g-bad-import-order
import test_training as training_test  # pylint: disable=g-bad-import-order

Sampling = sampling_lib.Sampling

GRID = (4, 4)  # 28x28 images through a factor-7 tokenizer
VOCAB = 16
NUM_CLASSES = 3
DIM = 32
LABELS = engine.class_labels(8, NUM_CLASSES)  # as sample.py draws them
SAMPLINGS = {'greedy': Sampling(temperature=0.0, cfg_scale=3.0),
             'sampled': Sampling(temperature=1.0, cfg_scale=3.0)}
OPTIONS = {'speculative': {'draft_len': 3}, 'ssd': {'draft_len': 3}, 'sjd': {'window': 4}}
DATA_SPLIT = [(method, s) for method in ('ar', 'speculative', 'ssd', 'sjd') for s in SAMPLINGS]
MODEL_SPLIT = [('ar', 'greedy'), ('speculative', 'greedy')]
# Float sums reorder under sharding. Measured here: model-split logits (|logit| <= 9)
# differ from one device's by at most 2e-6; parameters after a step (of size ~ the
# learning rate, 1e-3) by at most 4e-7: Adam divides each gradient by its own magnitude,
# so components near zero turn reordering noise into visible update noise.
LOGIT_TOL = 1e-4
NEAR_TIE = 1e-3  # a greedy token may flip only where its top-2 logits are this close
PARAM_TOL = 1e-5  # 1% of one step


def mesh_of(data, model):
  return sharding.make_mesh(data, model, devices=jax.devices()[:data * model])


# --- a tiny model, and a run folder holding it -------------------------------------------

def tiny_bundle(num_heads=2, mlp_dim=64, abstract=False):
  """A random 1-layer backbone with peaked logits (greedy ties become negligible) and heads
  pushed towards copying their source state, so drafts get accepted (helpers.heads_bundle).
  abstract: parameter shapes only, made without jax.jit (which no_compile replaces)."""
  if not abstract:
    return helpers.heads_bundle(VOCAB, GRID, num_horizontal=2, num_layers=1, dim=DIM,
                                num_heads=num_heads, mlp_dim=mlp_dim)
  model = helpers.tiny_model(VOCAB, GRID, NUM_CLASSES, num_layers=1, dim=DIM,
                             num_heads=num_heads, mlp_dim=mlp_dim)
  heads = heads_lib.NeighbourHeads(num_horizontal=2, num_vertical=1, dim=DIM, mlp_dim=32)
  shapes = lambda stage, module: sharding.strip_boxes(
      pretrained.boxed_abstract_params(stage, module))
  return helpers.bundle(model, shapes('ar', model), heads=(heads, shapes('heads', heads)))


TOKENIZER_SPEC = dict(codebook_size=VOCAB, code_dim=4, channels=8, num_res_blocks=0,
                      factor=7, image_channels=1)


def write_tokenizer(stage_dir):
  """A randomly initialised VQ tokenizer stage: 28x28 images <-> 4x4 grids of 16 codes."""
  module = vq.VQTokenizer(**TOKENIZER_SPEC)
  # Partitionable threefry makes XLA:CPU compile conv-kernel draws slowly; any init will do.
  with jax.threefry_partitionable(False):
    params = jax.jit(lambda k: module.init(k, jnp.zeros((1, 28, 28, 1)))['params'])(
        jax.random.key(0))
  helpers.save_stage(stage_dir, {'tokenizer': TOKENIZER_SPEC}, params)


def write_data(root):
  """Tiny Fashion-MNIST IDX files, prepared as the tfds dataset the configs read."""
  write_fashion_idx(root / 'idx')
  config = ar_config.get_config('smoke').data
  config.idx_dir, config.data_dir = str(root / 'idx'), str(root / 'tfds')
  pipeline.prepare_local(config.name, config.data_dir, config.idx_dir)


@pytest.fixture(scope='module')
def tiny():
  return tiny_bundle()


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory, tiny):
  """A run folder (tokenizer/, ar/, heads/) with the tiny bundle, as sample.py loads it."""
  root = tmp_path_factory.mktemp('run')
  write_tokenizer(str(root / 'tokenizer'))
  spec = lambda module: {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
                         if f.name not in ('parent', 'name')}
  helpers.save_stage(str(root / 'ar'), {'transformer': spec(tiny.model), 'class_names': []},
             tiny.params)
  heads = tiny.stage('heads')
  helpers.save_stage(str(root / 'heads'), {'heads': spec(heads.module)}, heads.params)
  return str(root)


# --- decoding -----------------------------------------------------------------------------

@pytest.fixture(scope='module')
def decoded(tiny):
  """{(method, sampling, mesh shape): tokens [B, N] (a global array)} for every setting.

  Compile time dominates: each loop is lowered here once and the compiles run two at a
  time, at LLVM's lowest optimisation level (a third faster). Both sides of every
  comparison compile alike; sharding is decided before, by XLA's SPMD partitioner.
  """
  jobs = ([(m, s, (1, 1)) for m, s in DATA_SPLIT] + [(m, s, (8, 1)) for m, s in DATA_SPLIT]
          + [(m, s, (4, 2)) for m, s in MODEL_SPLIT])
  inputs = {}
  for method, s, shape in jobs:
    decoder = engine.build_decoder(tiny, method, SAMPLINGS[s], OPTIONS.get(method),
                                   mesh_of(*shape))
    args = decoder.inputs(LABELS, engine.image_keys(0, 0, len(LABELS)))
    inputs[method, s, shape] = decoder.jitted.lower(*args), args
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    compiled = dict(zip(jobs, pool.map(lambda job: inputs[job][0].compile(
        compiler_options={'xla_backend_optimization_level': 0}), jobs)))
  return {job: compiled[job](*inputs[job][1])[0] for job in jobs}


@pytest.mark.parametrize('method,s', DATA_SPLIT)
def test_batch_split_over_data_gives_the_same_tokens(decoded, method, s):
  one, eight = decoded[method, s, (1, 1)], decoded[method, s, (8, 1)]
  # The loop really ran split: each device holds one sample's tokens.
  assert eight.sharding.spec == jax.sharding.PartitionSpec('data', None)
  assert {sh.data.shape for sh in eight.addressable_shards} == {(1, GRID[0] * GRID[1])}
  np.testing.assert_array_equal(np.asarray(eight), np.asarray(one))


def guided_logits(bundle, mesh, tokens, labels, cfg_scale):
  """Teacher-forced guided logits [B, N, V] with the parameters placed as build_decoder
  places them on `mesh` (the same logical rules and activation constraints)."""
  rules = sharding.DEFAULT_RULES
  shardings = engine.param_shardings(bundle, {'ar': bundle.params}, mesh, rules)
  params = jax.device_put(bundle.params, shardings['ar'])
  all_labels = np.concatenate([labels, np.full_like(labels, bundle.model.null_class)])

  def logits_fn(params, tokens, labels):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      logits, _ = bundle.model.apply({'params': params}, tokens, labels)
    return sampling_lib.guide(logits.reshape((2, -1) + logits.shape[1:]), cfg_scale)

  fn = jax.jit(logits_fn, in_shardings=(shardings['ar'], sharding.batch_sharding(
      mesh, 2), sharding.batch_sharding(mesh)))
  return np.asarray(fn(params, np.concatenate([tokens, tokens]), all_labels)), params


def test_model_split_logits_agree(tiny, decoded):
  tokens = np.asarray(decoded['ar', 'greedy', (1, 1)])
  cfg = SAMPLINGS['greedy'].cfg_scale
  one, _ = guided_logits(tiny, mesh_of(1, 1), tokens, LABELS, cfg)
  split, params = guided_logits(tiny, mesh_of(4, 2), tokens, LABELS, cfg)
  # The rules did split the parameters: attention heads, MLP and vocabulary over 'model'.
  model_axis = jax.sharding.PartitionSpec(None, 'model')
  for kernel in (params['block_0']['attn']['qkv']['kernel'], params['lm_head']['kernel'],
                 params['block_0']['mlp']['up']['kernel']):
    assert kernel.sharding.spec == model_axis
  diff = np.max(np.abs(split - one))
  print(f'model-split logits: max |diff| = {diff:.2e} (scale {np.max(np.abs(one)):.1f})')
  assert diff <= LOGIT_TOL


@pytest.mark.parametrize('method,s', MODEL_SPLIT)
def test_model_split_tokens_agree_up_to_near_ties(tiny, decoded, method, s):
  one = np.asarray(decoded[method, s, (1, 1)])
  split = np.asarray(decoded[method, s, (4, 2)])
  logits, _ = guided_logits(tiny, mesh_of(1, 1), one, LABELS, SAMPLINGS[s].cfg_scale)
  differing = [b for b in range(len(LABELS)) if (one[b] != split[b]).any()]
  for b in differing:
    i = int(np.argmax(one[b] != split[b]))  # same prefix before i: the same distribution
    top2 = np.sort(logits[b, i])[-2:]
    assert top2[1] - top2[0] < NEAR_TIE, (
        f'sample {b} differs at token {i}, where the target\'s top-2 logits are '
        f'{top2[1] - top2[0]:.3g} apart: not a near-tie')
  print(f'{method}: {len(differing)} of {len(LABELS)} samples differ on mesh (4, 2)')


def test_sample_job_on_a_mesh(run_dir, decoded, tmp_path):
  """sample.py's job end to end with --mesh_data=4 --mesh_model=2: outputs written, tokens
  those of one device."""
  args = sample_job.SampleArgs(method='speculative', num_images=8, batch_size=8,
                               temperature=0.0, cfg_scale=3.0,
                               options=OPTIONS['speculative'],
                               checkpoint=run_dir, out=str(tmp_path / 'samples.png'),
                               tokens_out=str(tmp_path / 'tokens.npy'),
                               report=str(tmp_path / 'report.json'), mesh_data=4,
                               mesh_model=2, progress=False)
  report = sample_job.run(args)
  assert os.path.exists(args.out) and os.path.exists(args.report)
  # Greedy speculative is lossless: plain AR's tokens on one device (same labels and keys).
  base = np.asarray(decoded['ar', 'greedy', (1, 1)]).reshape(-1, *GRID)
  np.testing.assert_array_equal(np.load(args.tokens_out), base)
  assert report['target_passes'] < GRID[0] * GRID[1]


def test_every_stage_of_every_method_is_split_by_the_rules(tiny, run_dir):
  """Each entry of a decoder's params (the backbone and every stage its method needs) is
  placed on the mesh by the logical axis rules: one the engine placed otherwise would stay
  replicated, or on one device."""
  mesh = mesh_of(4, 2)
  keys = jax.random.split(jax.random.key(1), 3)
  tok, tok_params, _ = pretrained.load_stage(os.path.join(run_dir, 'tokenizer'), 'tokenizer')
  drafter = hawk_model.HawkDrafter(dim=DIM, grid=GRID, width=16, num_heads=2, mlp_dim=32,
                                   num_layers=1, window_rows=1, window_cols=1)
  up = mulo_models.Upsampler(vocab_size=VOCAB, num_classes=NUM_CLASSES, grid=GRID,
                             num_layers=1, dim=16, num_heads=2, mlp_dim=32)
  low = helpers.tiny_model(VOCAB, up.low_grid, NUM_CLASSES, num_layers=1, dim=16,
                           num_heads=2, mlp_dim=32)
  heads = tiny.stage('heads')
  bundle = helpers.bundle(
      tiny.model, tiny.params, tok, tok_params, heads=(heads.module, heads.params),
      hawk_draft=(drafter, helpers.init_params(
          drafter, keys[0], *pretrained.init_args('hawk_draft', drafter))),
      mulo_draft=(low, helpers.model_params(low, keys[1])),
      mulo_upsampler=(up, helpers.init_params(up, keys[2],
                                              *mulo_models.upsampler_init_args(up))))
  options = dict(OPTIONS, lantern={'k': 8}, mulo={'k': 8})  # their default k exceeds this codebook
  split = set()
  for method in registry.all_methods():
    decoder = engine.build_decoder(bundle, method.name, Sampling(), options.get(method.name),
                                   mesh)
    # The tokenizer's codebook enters as a constant, not a parameter.
    assert set(decoder.params) == {'ar', *method.needs} - {'tokenizer'}, method.name
    for name, tree in decoder.params.items():
      want = pretrained.param_shardings(name, bundle.stage(name).module, mesh)
      assert jax.tree.structure(tree) == jax.tree.structure(want), (method.name, name)
      for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(want)):
        where = f'{method.name}: {name}{jax.tree_util.keystr(path)}'
        assert isinstance(x.sharding, jax.sharding.NamedSharding), where
        assert x.sharding.mesh == mesh and x.sharding.is_equivalent_to(s, x.ndim), where
        if 'model' in jax.tree.leaves(tuple(s.spec)):
          split.add(name)
  # The rules do split more than the backbone: the drafters' heads, MLPs and vocabularies.
  assert {'ar', 'hawk_draft', 'mulo_draft', 'mulo_upsampler'} <= split, split


@pytest.fixture
def no_compile(monkeypatch):
  """Lowering or calling any jitted function fails: errors must come before that."""

  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the bad mesh was refused')

  monkeypatch.setattr(jax, 'jit', lambda *a, **k: type('NotCompiled', (), dict(
      lower=refuse, __call__=refuse))())


BAD_MESHES = [
    # (bundle kwargs, generate kwargs, mesh, what the message must say)
    ({}, dict(batch_size=12), (8, 1), 'batch_size=12 is not divisible by the 8 data devices'),
    ({}, {}, (2, 4), 'the model has 2 attention heads, which the mesh splits over 4 devices'),
    (dict(num_heads=4, mlp_dim=34), {}, (2, 4),
     "has 34 along its 'mlp' axis, which the mesh splits over 'model' (4 devices)"),
]


@pytest.mark.parametrize('bundle_kwargs,kwargs,shape,message', BAD_MESHES)
def test_a_mesh_that_does_not_divide_is_refused(no_compile, bundle_kwargs, kwargs, shape,
                                                 message):
  bundle = tiny_bundle(abstract=True, **bundle_kwargs)  # shapes are all the checks need
  args = dict(num_images=8, batch_size=8, mesh=mesh_of(*shape), progress=False)
  args.update(kwargs)
  with pytest.raises(ValueError, match=re.escape(message)):
    engine.generate(bundle, 'ssd', Sampling(), **args)


# --- checkpoints across meshes ------------------------------------------------------------

def test_checkpoint_saved_on_one_device_restores_sharded_and_back(run_dir, tiny, tmp_path):
  mesh = mesh_of(4, 2)
  module, params, _ = pretrained.load_stage(os.path.join(run_dir, 'ar'), 'ar', mesh=mesh)
  want = pretrained.param_shardings('ar', module, mesh)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(want)):
    assert x.sharding.is_equivalent_to(s, x.ndim), jax.tree_util.keystr(path)
  assert params['lm_head']['kernel'].sharding.spec == jax.sharding.PartitionSpec(None, 'model')
  jax.tree.map(np.testing.assert_array_equal, params, tiny.params)
  # ... and back: saved sharded over 8 devices, restored onto one.
  helpers.save_stage(str(tmp_path / 'ar'), checkpoint.load_json(
      os.path.join(run_dir, 'ar', 'model.json')), params)
  _, back, _ = pretrained.load_stage(str(tmp_path / 'ar'), 'ar')
  assert {len(x.sharding.device_set) for x in jax.tree.leaves(back)} == {1}
  jax.tree.map(np.testing.assert_array_equal, back, tiny.params)


# --- training -----------------------------------------------------------------------------

def stage_config(module, root, **overrides):
  config = module.get_config('smoke')
  config.data.idx_dir, config.data.data_dir = str(root / 'idx'), str(root / 'tfds')
  config.num_steps = 2  # step 0 has learning rate 0 (warm-up); step 1 moves the parameters
  config.checkpoint_every = config.log_every = 2
  config.tokenizer_dir = str(root / 'tokenizer')
  return training_test.set_fields(config, overrides)


def train_on(monkeypatch, config, workdir, make_stage, shape):
  """(parameters at init, after training) of a stage trained without its evaluation on
  the first data*model devices."""
  monkeypatch.setattr(sharding, 'mesh_from_config', lambda c: mesh_of(*shape))
  stage = dataclasses.replace(make_stage(config, workdir), evaluate=lambda *a: {})
  state, _ = loop.train(config, workdir, stage)
  init = sharding.strip_boxes(stage.init_params(jax.random.key(config.seed)))
  return init, state.params


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('train')
  write_data(root)
  write_tokenizer(str(root / 'tokenizer'))
  return root


def max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# The loop is the same for every stage; heads adds frozen parameters (replicated). Mesh
# (4, 2) splits both the batch and the parameters.
TRAIN_MESHES = {'ar': [(8, 1), (4, 2)], 'heads': [(4, 2)]}


@pytest.mark.parametrize('stage', ['ar', 'heads'])
def test_a_training_step_is_the_same_on_every_mesh(monkeypatch, data_root, stage):
  make_stage = {'ar': ar_stage.make_stage, 'heads': heads_stage.make_stage}[stage]
  config = stage_config({'ar': ar_config, 'heads': heads_config}[stage], data_root)
  if stage == 'heads':  # the frozen backbone: the ar stage trained on one device
    config.ar_dir = str(data_root / 'ar_1' / 'ar')
    if not os.path.exists(config.ar_dir):  # (the ar case trains it when it runs first)
      train_on(monkeypatch, stage_config(ar_config, data_root), str(data_root / 'ar_1'),
               ar_stage.make_stage, (1, 1))
  init, one = train_on(monkeypatch, config, str(data_root / f'{stage}_1'), make_stage, (1, 1))
  moved = max_diff(init, one)
  assert moved > config.learning_rate / 2, moved  # the step did move the parameters
  for shape in TRAIN_MESHES[stage]:
    _, params = train_on(monkeypatch, config, str(data_root / f'{stage}_{shape[0]}x{shape[1]}'),
                         make_stage, shape)
    if stage == 'ar' and shape == (4, 2):
      assert params['lm_head']['kernel'].sharding.spec == jax.sharding.PartitionSpec(
          None, 'model')
    diff = max_diff(params, one)
    print(f'{stage} on {shape}: max |param diff| vs one device = {diff:.2e}')
    assert diff <= PARAM_TOL


def test_training_refuses_a_batch_the_mesh_does_not_divide(monkeypatch, data_root,
                                                           tmp_path):
  config = stage_config(ar_config, data_root, batch_size=12)
  stage = ar_stage.make_stage(config, str(tmp_path))
  monkeypatch.setattr(jax, 'jit', None)  # nothing may compile
  with pytest.raises(ValueError, match=re.escape(
      'batch_size=12 is not divisible by the 8 data devices')):
    loop.train(config, str(tmp_path), stage)
