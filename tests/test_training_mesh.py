"""train.py fails early and briefly: a mesh that splits the attention heads unevenly is
refused before anything compiles, and a missing dataset, a --workdir that is a file or a bad
config field end in one line on stderr and exit code 2, without a traceback."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from configs import ar as ar_config
from configs import hawk_draft as hawk_config
from configs import mulo_draft as mulo_draft_config
from configs import mulo_upsampler as mulo_upsampler_config
from ssd_jax import pretrained
from ssd_jax.training import ar_stage
from ssd_jax.training import checkpoint
from ssd_jax.training import loop
from ssd_jax.training import stages
import helpers  # pylint: disable=g-bad-import-order
import test_sharding  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each smoke config has 2 attention heads; a 2 x 4 mesh splits them over 4 devices, which
# the shapes alone would allow (the qkv kernel is 2 * 16 * 3 = 96 wide).
HEADED_STAGES = {'ar': ar_config, 'mulo_draft': mulo_draft_config,
                 'mulo_upsampler': mulo_upsampler_config, 'hawk_draft': hawk_config}


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  """Data, a tokenizer and an ar stage (zero parameters: nothing here trains)."""
  root = tmp_path_factory.mktemp('train_mesh')
  test_sharding.write_data(root)
  test_sharding.write_tokenizer(str(root / 'tokenizer'))
  config = test_sharding.stage_config(ar_config, root)
  tokenizer, _, _ = pretrained.load_stage(str(root / 'tokenizer'), 'tokenizer')
  spec = {'transformer': ar_stage.transformer_spec(config, tokenizer, 28)}
  module = pretrained.transformer_module(spec)
  abstract = pretrained.abstract_params(module, spec, pretrained.init_args('ar', module))
  helpers.save_stage(str(root / 'ar'), spec,
                           jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
  return root


@pytest.mark.parametrize('name', sorted(HEADED_STAGES))
def test_a_mesh_that_splits_the_heads_is_refused(root, name, tmp_path, monkeypatch):
  config = test_sharding.stage_config(HEADED_STAGES[name], root, **{'mesh.model': 4})
  if name == 'hawk_draft':
    config.ar_dir = str(root / 'ar')
  stage = __import__(stages.STAGES[name], fromlist=['make_stage']).make_stage(
      config, str(tmp_path))

  def refuse(*args, **kwargs):
    raise AssertionError('compiled before the mesh was refused')
  monkeypatch.setattr(jax, 'jit', refuse)

  message = (f'the {name} model has 2 attention heads, which the mesh splits over 4 devices: '
             'not divisible. Choose --config.mesh.model 1 or 2')
  with pytest.raises(ValueError, match=re.escape(message)):
    loop.train(config, str(tmp_path), stage)
  assert not checkpoint.StageCheckpoints(str(tmp_path / name)).exists()


def train_py(*args):
  return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=120, check=False)


def test_cli_errors_are_one_line_and_exit_2(root, tmp_path):
  data = [f'--config.data.idx_dir={root / "idx"}', f'--config.data.data_dir={root / "tfds"}']
  a_file = tmp_path / 'a_file'
  a_file.write_text('')
  cases = {
      'Fashion-MNIST IDX files not found in /nonexistent': [
          '--config=configs/tokenizer.py:smoke', f'--workdir={tmp_path / "run"}',
          '--config.data.idx_dir=/nonexistent', f'--config.data.data_dir={tmp_path / "tfds"}'],
      f'--workdir={a_file} is a file': [
          '--config=configs/tokenizer.py:smoke', f'--workdir={a_file}'],
      'the ar model has 2 attention heads, which the mesh splits over 4 devices': [
          '--config=configs/ar.py:smoke', f'--workdir={tmp_path / "run"}',
          f'--config.tokenizer_dir={root / "tokenizer"}', '--config.mesh.model=4', *data],
      "names a field the config does not have: 'no_such_field'": [
          '--config=configs/ar.py:smoke', f'--workdir={tmp_path / "run"}',
          '--config.no_such_field=1'],
  }
  for message, args in cases.items():
    run = train_py(*args)
    assert run.returncode == 2, (message, run.stderr[-3000:])
    assert run.stderr.startswith('train.py: error: ') and message in run.stderr, run.stderr
    assert run.stderr.rstrip().endswith('(see --help)'), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
