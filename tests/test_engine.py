"""The engine and the command line around the methods: the registry is the only place that
knows them, decoders compile once per static setting, and bad input ends in one line.
"""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

import helpers  # pylint: disable=g-bad-import-order
from configs import bench as bench_config
from ssd_jax import bench_job
from ssd_jax import pretrained
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Sampling = sampling_lib.Sampling


def test_engine_names_no_method():
  source = open(os.path.join(ROOT, 'ssd_jax', 'decoding', 'engine.py')).read()
  for name in registry.names():
    assert not re.search(rf"""['"]{name}['"]""", source), f'engine.py names {name!r}'


def test_every_method_declares_documented_options():
  for method in registry.all_methods():
    assert method.summary and isinstance(method.lossless, bool)
    for stage in method.needs:
      assert stage in pretrained.MODULES, (method.name, stage)
    for field, _, doc, _ in registry.fields(method):
      assert doc, f'{method.name}.{field} has no doc'
    method.validate(method.make_options())  # the defaults are valid


class CompileCounter:
  """Counts XLA backend compilations while active."""

  def __init__(self):
    self.count = 0
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event, duration, **kwargs):
    del duration, kwargs
    if event == '/jax/core/compile/backend_compile_duration':
      self.count += 1


def test_a_sweep_over_guidance_and_temperature_compiles_once():
  bundle = helpers.heads_bundle(8, (2, 3), num_layers=1, dim=16, mlp_dim=32)
  mesh = helpers.one_device_mesh()
  counter = CompileCounter()
  results = {}
  for cfg, temperature in ((1.5, 1.0), (3.0, 1.0), (3.0, 0.7), (1.5, 0.5)):
    sampling = Sampling(temperature=temperature, cfg_scale=cfg)
    before = counter.count
    results[cfg, temperature] = engine.generate(
        bundle, 'speculative', sampling, num_images=4, batch_size=4, mesh=mesh,
        progress=False)
    if (cfg, temperature) != (1.5, 1.0):
      assert results[cfg, temperature].stats['compile_seconds'] == 0.0
      assert counter.count == before, f'cfg {cfg}, temperature {temperature} recompiled'
  # The traced values are used: other settings, other tokens.
  assert not np.array_equal(results[1.5, 1.0].tokens, results[3.0, 1.0].tokens)
  assert not np.array_equal(results[3.0, 1.0].tokens, results[3.0, 0.7].tokens)
  # A static change (greedy, or no guidance: no unconditional half) compiles anew.
  before = counter.count
  engine.generate(bundle, 'speculative', Sampling(temperature=0.0, cfg_scale=1.5),
                  num_images=4, batch_size=4, mesh=mesh, progress=False)
  assert counter.count > before


def test_traced_guidance_gives_the_tokens_of_a_fresh_compile():
  bundle = helpers.heads_bundle(8, (2, 3), num_layers=1, dim=16, mlp_dim=32)
  mesh = helpers.one_device_mesh()
  sampling = Sampling(temperature=0.8, cfg_scale=2.5)
  args = dict(num_images=4, batch_size=4, mesh=mesh, progress=False)
  engine.generate(bundle, 'sjd', Sampling(temperature=1.0, cfg_scale=1.5), **args)
  reused = engine.generate(bundle, 'sjd', sampling, **args)
  fresh = engine.generate(helpers.fresh(bundle), 'sjd', sampling, **args)
  np.testing.assert_array_equal(reused.tokens, fresh.tokens)


def test_bench_settings_are_data_checked_before_loading():
  config = bench_config.get_config()
  labels = [s.label for s in bench_job.settings_of(config)]
  assert labels[:2] == ['ar', 'ar (seed 1)'] and 'ssd rounds=2' in labels
  config.settings = (('ssd', {'round': 2}),)
  with pytest.raises(ValueError, match="method 'ssd' has no option 'round'"):
    bench_job.settings_of(config)
  config.settings = (('ssd', {'rounds': -1}),)
  with pytest.raises(ValueError, match=re.escape('--ssd_rounds=-1 must be >= 0')):
    bench_job.settings_of(config)


# --- the command line ---------------------------------------------------------------------

def run_script(*args, script='sample.py'):
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=120, env=env, check=False)


@pytest.mark.parametrize('args,message', [
    (['--num_images=abc'], '--num_images=abc'),
    (['--method=fast'], "flag --method=fast: value should be one of"),
    (['--no_such_flag=1'], 'no_such_flag'),
    (['--method=ssd', '--sjd_window=3'], "--sjd_window is an option of method 'sjd'"),
    (['--ssd_rounds=-1'], '--ssd_rounds=-1 must be >= 0'),
    (['--checkpoint=README.md'], '--checkpoint=README.md is a file'),
    (['--out=/proc/ssd_jax_no_dir/x.png'], '--out=/proc/ssd_jax_no_dir/x.png cannot be '
     'written'),
    (['--method=hawk', '--checkpoint=tests'], 'has no ar/ stage'),
])
def test_sample_cli_fails_in_one_line(args, message):
  out = run_script(*args)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('sample.py: error: '), out.stderr
  assert message in lines[0] and lines[0].endswith('(see --help)'), lines[0]
  assert not out.stdout


def test_sample_help_lists_every_method_knob():
  out = run_script('--help')
  assert 'sample.py:' in out.stdout, out.stderr
  for method in registry.all_methods():
    for field, *_ in registry.fields(method):
      assert f'--{method.flag(field)}' in out.stdout, method.flag(field)


def test_bench_cli_refuses_a_bad_setting_in_one_line():
  out = run_script('--config=configs/bench.py', "--config.settings=(('ssd', {'round': 1}),)",
                   script='bench.py')
  assert out.returncode == 2, out.stderr
  assert out.stderr.strip().splitlines() == [
      "bench.py: error: method 'ssd' has no option 'round'; its options are draft_len, "
      'horizontal_first, rounds. (see --help)']


def test_bfloat16_runs_every_stage_in_bfloat16_and_bad_dtypes_are_refused():
  bundle = helpers.heads_bundle(8, (2, 3), num_layers=1, dim=16, mlp_dim=32)
  mesh = helpers.one_device_mesh()
  decoder = engine.build_decoder(bundle, 'speculative', Sampling(cfg_scale=2.0), mesh=mesh,
                                 dtype='bfloat16')
  leaves = jax.tree.leaves(decoder.params)
  assert {str(x.dtype) for x in leaves} == {'bfloat16'}  # backbone and heads alike
  labels, keys = np.arange(4) % 3, engine.image_keys(0, 0, 4)
  hlo = decoder.jitted.lower(*decoder.inputs(labels, keys)).as_text()
  assert re.search(r'tensor<1x8x2x\d+x8xbf16>', hlo), 'the KV cache is not bfloat16'
  tokens, _ = decoder(labels, keys)
  assert ((np.asarray(tokens) >= 0) & (np.asarray(tokens) < 8)).all()
  with pytest.raises(ValueError, match=re.escape('--dtype=float16 must be one of')):
    engine.build_decoder(bundle, 'ar', Sampling(), mesh=mesh, dtype='float16')
