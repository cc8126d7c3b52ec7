"""The shared training loop end to end: smoke runs of tokenizer -> ar -> heads, resume after a
stop, refusal of corrupt or mismatched checkpoints, the non-finite guard, frozen backbone."""

import dataclasses
import json
import os
import re
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ar as ar_config
from configs import heads as heads_config
from configs import tokenizer as tokenizer_config
from ssd_jax import pretrained
from ssd_jax.data import pipeline
from ssd_jax.training import checkpoint
from ssd_jax.training import heads_stage
from ssd_jax.training import loop
from ssd_jax.training import stages
from ssd_jax.training import tokenizer_stage
from test_data import write_fashion_idx  # pylint: disable=g-bad-import-order

CONFIGS = {'tokenizer': tokenizer_config, 'ar': ar_config, 'heads': heads_config}


def no_partitionable_threefry():
  """XLA:CPU takes ~5 s to compile each 4D conv-kernel draw with partitionable threefry;
  the tokenizer's properties here do not depend on how its init is drawn."""
  return jax.threefry_partitionable(False)


def smoke_config(root, stage, **overrides):
  config = CONFIGS[stage].get_config('smoke')
  config.data.idx_dir = str(root / 'idx')
  config.data.data_dir = str(root / 'tfds')
  return set_fields(config, overrides)


def set_fields(config, overrides):
  """Sets dotted keys ('model.dim') of a config, as --config.model.dim=... would."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split('.')
    for name in path:
      node = node[name]
    node[leaf] = value
  return config


def to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


def without_evaluation(stage):
  return dataclasses.replace(stage, evaluate=lambda *args: {})


def read_metrics(stage_dir):
  with open(os.path.join(stage_dir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """One smoke run of each stage in a shared workdir (the later tests copy what they break)."""
  root = tmp_path_factory.mktemp('runs')
  write_fashion_idx(root / 'idx')
  workdir = str(root / 'work')
  configs = {
      # restart_every=3: the step after the resume point restarts codes from restored usage.
      'tokenizer': smoke_config(root, 'tokenizer', checkpoint_every=4,
                                **{'vq.restart_every': 3}),
      'ar': smoke_config(root, 'ar', checkpoint_every=4),
      # Context-free heads: test_context_heads_start_from_trained_heads grows them.
      'heads': smoke_config(root, 'heads', num_steps=8, log_every=1, checkpoint_every=8,
                            learning_rate=1e-2, **{'heads.context': 0}),
  }
  with no_partitionable_threefry():
    tok_state, _ = stages.run(configs['tokenizer'], workdir)
  stages.run(configs['ar'], workdir)
  ar_dir = os.path.join(workdir, 'ar')
  backbone_saved = to_numpy(pretrained.load_stage(ar_dir, 'ar')[1])
  stage = heads_stage.make_stage(configs['heads'], workdir)
  backbone_given = to_numpy(stage.frozen['backbone'])
  loop.train(configs['heads'], workdir, stage)
  return dict(root=root, workdir=workdir, configs=configs,
              tokenizer_params=to_numpy(tok_state.params),
              tokenizer_extra=to_numpy(tok_state.extra), backbone_saved=backbone_saved,
              backbone_given=backbone_given, backbone_after=to_numpy(stage.frozen['backbone']))


def test_stages_write_their_outputs(runs):
  for stage in ('tokenizer', 'ar', 'heads'):
    stage_dir = os.path.join(runs['workdir'], stage)
    for name in ('config.json', 'model.json', 'results.json', 'metrics.jsonl'):
      assert os.path.exists(os.path.join(stage_dir, name)), (stage, name)
    config = runs['configs'][stage]
    assert checkpoint.StageCheckpoints(stage_dir).latest_step() == config.num_steps
    results = checkpoint.load_json(os.path.join(stage_dir, 'results.json'))
    assert results['step'] == config.num_steps
    assert read_metrics(stage_dir)[-1]['step'] == config.num_steps
    assert checkpoint.load_json(os.path.join(stage_dir, 'config.json')) == json.loads(
        json.dumps(config.to_dict()))
  tok = checkpoint.load_json(os.path.join(runs['workdir'], 'tokenizer', 'results.json'))
  assert tok['grid'] == [14, 14] and 0 < tok['code_use'] <= 1 and np.isfinite(tok['psnr'])
  assert os.path.exists(os.path.join(runs['workdir'], 'tokenizer', 'reconstructions.png'))
  ar = checkpoint.load_json(os.path.join(runs['workdir'], 'ar', 'results.json'))
  assert 0 < ar['val_bits_per_token'] < 12
  assert os.path.exists(os.path.join(runs['workdir'], 'ar', 'samples.png'))
  heads = checkpoint.load_json(os.path.join(runs['workdir'], 'heads', 'results.json'))
  names = ['horizontal_1', 'horizontal_2', 'horizontal_3', 'vertical_1', 'vertical_2']
  for name in names:
    assert 0 <= heads[name]['top1_agreement'] <= 1 and 0 < heads[name]['acceptance'] <= 1


def test_heads_loss_falls_with_the_backbone_frozen(runs):
  metrics = read_metrics(os.path.join(runs['workdir'], 'heads'))
  for name in ('loss', 'smooth_l1'):
    values = [m[name] for m in metrics]
    assert np.mean(values[-2:]) < np.mean(values[:2]), (name, values)
  # Bit-identical: the backbone handed to the stage, after training, and as saved.
  assert_trees_equal(runs['backbone_after'], runs['backbone_given'])
  assert_trees_equal(runs['backbone_after'], runs['backbone_saved'])
  assert_trees_equal(to_numpy(pretrained.load_stage(
      os.path.join(runs['workdir'], 'ar'), 'ar')[1]), runs['backbone_saved'])


def test_resume_after_a_stop_gives_identical_parameters(runs, tmp_path, monkeypatch, capsys):
  """SIGTERM after step 2 of 4 (a checkpoint), rerun: the same parameters as one run."""
  config = runs['configs']['tokenizer']
  stop_at = 2
  next_batch = pipeline.Batches.__next__

  def next_then_stop(self):
    batch = next_batch(self)
    if self.step == stop_at:  # the batch of step stop_at - 1 is out: stop after that step
      os.kill(os.getpid(), signal.SIGTERM)
    return batch

  stage = without_evaluation(tokenizer_stage.make_stage(config))
  monkeypatch.setattr(pipeline.Batches, '__next__', next_then_stop)
  with no_partitionable_threefry(), pytest.raises(SystemExit) as stopped:
    loop.train(config, str(tmp_path), stage)
  assert stopped.value.code == 143
  assert checkpoint.StageCheckpoints(tmp_path / 'tokenizer').latest_step() == stop_at
  monkeypatch.undo()
  capsys.readouterr()

  with no_partitionable_threefry():
    state, _ = loop.train(config, str(tmp_path), stage)
  assert re.search(rf'resumed from \S+ at step {stop_at}\n', capsys.readouterr().out)
  assert int(state.step) == config.num_steps
  assert_trees_equal(to_numpy(state.params), runs['tokenizer_params'])
  assert_trees_equal(to_numpy(state.extra), runs['tokenizer_extra'])


def _corrupt_data(step_dir, item='params'):
  for name in os.listdir(os.path.join(step_dir, item, 'd')):
    path = os.path.join(step_dir, item, 'd', name)
    with open(path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(data[:len(data) // 2])


CORRUPTIONS = {
    'params data truncated': _corrupt_data,
    'params metadata deleted': lambda d: os.remove(os.path.join(d, 'params', '_METADATA')),
    'optimizer state truncated': lambda d: _corrupt_data(d, 'train'),
}


@pytest.mark.parametrize('corruption', sorted(CORRUPTIONS))
def test_corrupt_checkpoint_is_refused(runs, tmp_path, corruption):
  config = runs['configs']['tokenizer']
  shutil.copytree(os.path.join(runs['workdir'], 'tokenizer'), tmp_path / 'tokenizer')
  step_dir = tmp_path / 'tokenizer' / 'checkpoints' / str(config.num_steps)
  CORRUPTIONS[corruption](str(step_dir))
  stage = without_evaluation(tokenizer_stage.make_stage(config))
  with pytest.raises(checkpoint.CheckpointError, match='corrupt') as refused:
    loop.train(config, str(tmp_path), stage)
  blamed = str(refused.value).split(' (')[0]  # the part before the underlying error
  assert str(step_dir) in blamed
  if corruption.startswith('optimizer'):
    assert 'params' not in blamed  # the parameters are fine; do not send users after them


def test_checkpoint_of_another_width_is_refused(runs, tmp_path):
  for stage in ('tokenizer', 'ar'):
    shutil.copytree(os.path.join(runs['workdir'], stage), tmp_path / stage)
  model_json = (tmp_path / 'ar' / 'model.json').read_bytes()
  config = smoke_config(runs['root'], 'ar', **{'model.dim': 48})
  with pytest.raises(checkpoint.CheckpointError) as refused:
    stages.run(config, str(tmp_path))
  message = str(refused.value)
  name = re.search(r"parameter '([\w/]+)' has shape \((.*)\) in the checkpoint but \((.*)\) "
                   'in this config', message)
  assert name, message
  assert '32' in name.group(2) and '48' in name.group(3)
  # Refused before anything was overwritten.
  assert (tmp_path / 'ar' / 'model.json').read_bytes() == model_json


def test_load_stage_refuses_another_shape(runs, tmp_path):
  stage_dir = tmp_path / 'ar'
  shutil.copytree(os.path.join(runs['workdir'], 'ar'), stage_dir)
  spec = checkpoint.load_json(stage_dir / 'model.json')
  spec['transformer']['mlp_dim'] *= 2
  checkpoint.save_json(str(stage_dir / 'model.json'), spec)
  with pytest.raises(checkpoint.CheckpointError, match=r"parameter '[\w/]*mlp[\w/]*'"):
    pretrained.load_stage(str(stage_dir), 'ar')


def test_check_compatible_names_the_parameter():
  saved = {'a': {'kernel': jnp.zeros((2, 3))}, 'b': jnp.zeros(4)}
  checkpoint.check_compatible(saved, saved, 'here')
  with pytest.raises(checkpoint.CheckpointError, match=r"'a/kernel' has shape \(2, 3\)"):
    checkpoint.check_compatible(saved, {'a': {'kernel': jnp.zeros((2, 4))}, 'b': jnp.zeros(4)},
                                'here')
  with pytest.raises(checkpoint.CheckpointError, match="'c' is missing"):
    checkpoint.check_compatible(saved, dict(saved, c=jnp.zeros(1)), 'here')
  with pytest.raises(checkpoint.CheckpointError, match="has parameter 'b'"):
    checkpoint.check_compatible(saved, {'a': saved['a']}, 'here')


def linear_stage():
  """A stage with one linear layer: the loop's behaviour without a model's compile time."""

  def loss_fn(params, frozen, batch, key, extra):
    del frozen, key, extra
    x = batch['image'].reshape(batch['image'].shape[0], -1).astype(jnp.float32) / 255
    mse = jnp.mean((x @ params['w'] - batch['label']) ** 2)
    return mse, ({'mse': mse}, None)

  return loop.Stage(name='linear', init_params=lambda key: {'w': jnp.zeros(28 * 28)},
                    loss_fn=loss_fn, evaluate=lambda *args: {})


def test_non_finite_loss_stops_with_the_metric_name(runs, tmp_path):
  config = smoke_config(runs['root'], 'tokenizer', learning_rate=1e30, num_steps=6,
                        log_every=1, checkpoint_every=1)
  with pytest.raises(FloatingPointError) as stopped:
    loop.train(config, str(tmp_path), linear_stage())
  message = str(stopped.value)
  found = re.search(r"metric '(\w+)' is (\S+) at step (\d+)", message)
  assert found, message
  assert found.group(1) in ('mse', 'loss', 'grad_norm')
  assert not np.isfinite(float(found.group(2)))
  bad_step = int(found.group(3))
  last_good = int(re.search(r'last good checkpoint \(step (\d+)\)', message).group(1))
  assert 0 < last_good < bad_step < config.num_steps
  # The last good checkpoint is committed (not left half-written) and the diverged state
  # is not saved over it.
  ckpt_dir = tmp_path / 'linear' / 'checkpoints'
  assert sorted(os.listdir(ckpt_dir)) == [str(s) for s in range(1, last_good + 1)]
  assert checkpoint.StageCheckpoints(tmp_path / 'linear').latest_step() == last_good


def test_batch_size_not_divisible_by_devices(runs, tmp_path):
  config = smoke_config(runs['root'], 'tokenizer', batch_size=12)
  with pytest.raises(ValueError, match='multiple of 8'):
    loop.train(config, str(tmp_path), linear_stage())


def test_context_heads_start_from_trained_heads(runs, tmp_path):
  """heads.init_from with more context than the trained heads (the smoke heads have none):
  the run starts exactly at the trained heads (its first loss equals theirs, with 2 or 3
  context positions) and trains; mismatched heads are refused."""
  workdir = str(tmp_path / 'ctx')
  heads_dir = os.path.join(runs['workdir'], 'heads')
  common = dict(tokenizer_dir=os.path.join(runs['workdir'], 'tokenizer'),
                ar_dir=os.path.join(runs['workdir'], 'ar'), num_steps=2, log_every=1,
                checkpoint_every=2, learning_rate=1e-2)
  config = smoke_config(runs['root'], 'heads', **common, **{
      'heads.context': 3, 'heads.init_from': heads_dir})
  loop.train(config, workdir, without_evaluation(heads_stage.make_stage(config, workdir)))
  first = read_metrics(os.path.join(workdir, 'heads'))[0]
  plain = smoke_config(runs['root'], 'heads', **common, **{'heads.context': 2,
                                                           'heads.init_from': heads_dir})
  plain_dir = str(tmp_path / 'plain')
  loop.train(plain, plain_dir, without_evaluation(heads_stage.make_stage(plain, plain_dir)))
  assert first['loss'] == pytest.approx(read_metrics(os.path.join(plain_dir, 'heads'))[0]['loss'],
                                        rel=1e-5)
  spec = checkpoint.load_json(os.path.join(workdir, 'heads', 'model.json'))['heads']
  assert spec['context'] == 3 and 'init_from' not in spec
  wrong = smoke_config(runs['root'], 'heads', **common, **{
      'heads.init_from': heads_dir, 'heads.num_horizontal': 2})
  with pytest.raises(ValueError, match='init_from'):
    heads_stage.make_stage(wrong, str(tmp_path / 'wrong'))
