"""Every config loads (full and :smoke), is locked, and refuses unknown overrides by name."""

import glob
import importlib
import os
import re
import subprocess
import sys

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from ssd_jax.training import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_PATHS = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py'))
                      + glob.glob(os.path.join(REPO, 'configs', 'llamagen', '*.py')))
# configs/heads.py -> 'heads', configs/llamagen/heads_b256.py -> 'llamagen.heads_b256'.
CONFIG_FILES = sorted(
    os.path.relpath(path, os.path.join(REPO, 'configs'))[:-3].replace(os.sep, '.')
    for path in CONFIG_PATHS if os.path.basename(path) not in ('__init__.py', 'common.py'))
# bench.py's configs (bench, speed, mulo_tune) are no training stage.
STAGE_CONFIGS = [name for name in CONFIG_FILES if name not in ('bench', 'speed', 'mulo_tune')]


def _leaves(config, prefix=''):
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f'{prefix}{key}.')
    else:
      yield prefix + key


def test_there_are_configs():
  assert {'tokenizer', 'ar', 'heads', 'llamagen.heads_b256',
          'llamagen.heads_l384'} <= set(CONFIG_FILES)


@pytest.mark.parametrize('name', STAGE_CONFIGS)
@pytest.mark.parametrize('arg', [None, 'smoke'])
def test_config_loads(name, arg):
  config = importlib.import_module(f'configs.{name}').get_config(arg)
  assert isinstance(config, ml_collections.ConfigDict)
  assert isinstance(config.stage, str) and config.stage
  if config.stage in ('tokenizer', 'ar', 'heads'):
    assert config.stage in stages.STAGES
  if arg == 'smoke':
    full = importlib.import_module(f'configs.{name}').get_config()
    assert config.num_steps <= min(full.num_steps, 100)
    assert config.batch_size <= full.batch_size
  # train.py locks it: then a typo is an error, not a new field.
  config.lock()
  with pytest.raises(AttributeError, match='no_such_key'):
    config.no_such_key = 1


@pytest.mark.parametrize('name', CONFIG_FILES)
def test_unknown_variant_is_refused(name):
  with pytest.raises(ValueError, match='nope'):
    importlib.import_module(f'configs.{name}').get_config('nope')


def test_every_field_has_a_comment():
  sources = ''.join(open(p).read() for p in CONFIG_PATHS)
  for name in CONFIG_FILES:
    for field in _leaves(importlib.import_module(f'configs.{name}').get_config()):
      leaf = re.escape(field.split('.')[-1])
      assert re.search(rf'\.{leaf} = [^\n]*# ', sources), f'{name}: {field} has no comment'


def _parse(*args):
  """Parses a command line the way train.py does (a locked config file flag)."""
  argv = ['train.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'test', flag_values=flag_values,
                                  lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_override_sets_a_field():
  config = _parse(f'--config={REPO}/configs/ar.py:smoke', '--config.model.dim=48')
  assert config.model.dim == 48 and config.batch_size == 8


@pytest.mark.parametrize('key', ['no_such_key', 'model.no_such_key'])
def test_unknown_override_is_refused_by_name(key):
  with pytest.raises(Exception, match='no_such_key'):
    _parse(f'--config={REPO}/configs/ar.py:smoke', f'--config.{key}=1')


def test_train_py_refuses_unknown_override(tmp_path):
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'train.py', '--config=configs/tokenizer.py:smoke',
       '--config.no_such_key=1', f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert result.returncode != 0
  assert 'no_such_key' in result.stderr
  assert not workdir.exists()  # refused before anything ran


def test_mulo_is_tuned_on_other_seeds_than_the_reported_ones():
  """configs/mulo_tune.py picks MuLo's defaults; its seeds (and noise seeds) must not be the
  ones docs/results.md reports from configs/bench.py."""
  tune = importlib.import_module('configs.mulo_tune').get_config()
  bench = importlib.import_module('configs.bench').get_config()
  seeds = lambda c: {c.seed, c.seed + 1 if c.noise_seed < 0 else c.noise_seed}
  assert not seeds(tune) & seeds(bench)
  assert tune.settings and all(method == 'mulo' for method, _ in tune.settings)
