"""bench.py's speed mode and scripts/device_bench.sh, end to end on the release checkpoint."""

import json
import os
import subprocess
import sys

import pytest

from configs import speed as speed_config
from ssd_jax import speed_bench
from ssd_jax.decoding import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ('floor_1_ms', 'floor_k_ms', 'ms_per_pass', 'pass_over_floor_k')


def test_every_method_declares_the_block_its_passes_feed():
  grid = (14, 14)
  blocks = {m.name: m.block_tokens(m.make_options(), grid) for m in registry.all_methods()}
  assert all(isinstance(k, int) and k >= 1 for k in blocks.values()), blocks
  assert blocks['ar'] == 1 and blocks['speculative'] == 4 + 1
  assert blocks['ssd'] == max(4 + 1, 14) and blocks['sjd'] == 16 + 1
  assert blocks['hawk'] == 5 + 5 * 6 // 2 + 1  # tree of K + K(K+1)/2 drafts and the root
  ssd = registry.get('ssd')
  assert ssd.block_tokens(ssd.make_options(draft_len=20), grid) == 21


def test_speed_settings_are_checked_before_loading():
  config = speed_config.get_config()
  assert [s.label for s in speed_bench.settings_of(config)][:3] == ['ar', 'speculative',
                                                                    'ssd rounds=1']
  for field, value, message in [('batches', ((4, 2),), r'\(batch size, images\)'),
                                ('dtypes', ('float16',), "has 'float16'"),
                                ('repeats', 0, 'must be >= 1')]:
    bad = speed_config.get_config()
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=message):
      speed_bench.check_config(bad)
  config.settings = (('ssd', {'rounds': -1}),)
  with pytest.raises(ValueError, match='--ssd_rounds=-1 must be >= 0'):
    speed_bench.settings_of(config)


def test_speed_smoke_writes_latency_and_throughput_tables_with_floors(tmp_path):
  config = speed_config.get_config('smoke')
  config.progress = False
  summary = speed_bench.run(config, str(tmp_path), command='python bench.py --smoke')
  with open(tmp_path / 'results.json') as f:
    saved = json.load(f)
  assert saved['checkpoint'] == os.path.join('checkpoints', 'fmnist')  # not this machine's
  assert [(r['batch_size'], r['label']) for r in saved['rows']] == [
      (1, 'ar'), (1, 'speculative'), (2, 'ar'), (2, 'speculative')]
  for row in saved['rows']:
    assert all(row[key] > 0 for key in FLOORS), row
    assert row['target_passes'] > 0 and row['compile_seconds'] > 0
    # The fastest timed run counts (interference only adds time).
    assert row['run_seconds'] == min(row['run_seconds_each'])
    if row['method'] == 'ar':
      assert row['speedup_passes'] == row['speedup_wall'] == 1.0
      assert row['block_tokens'] == 1 and row['floor_k_ms'] == row['floor_1_ms']
    else:
      assert row['block_tokens'] == 5 and row['speedup_passes'] > 1
  table = (tmp_path / 'results.md').read_text()
  assert '## Latency (batch 1), float32' in table and '## Throughput (batch 2), float32' in table
  assert '| 2 | speculative | True | 5 |' in table and 'python bench.py --smoke' in table
  assert saved['machine']['devices'] in table and len(summary['rows']) == 4
  if saved['busy_before'] is not None:  # other work on the machine is named in the report
    assert f"CPUs busy with other work just before timing: {saved['busy_before']:.2f}" in table


def test_time_limit_lists_what_it_skipped(tmp_path):
  config = speed_config.get_config('smoke')
  config.time_limit, config.progress = 1e-9, False
  summary = speed_bench.run(config, str(tmp_path))
  assert not summary['rows'] and len(summary['skipped']) == 4
  assert 'batch 2 speculative (float32): time limit' in (tmp_path / 'results.md').read_text()


def device_bench(*args, tmp_path):
  # The lent accelerator images lack tensorflow-datasets and array_record: the script's
  # code path must not import them.
  blocker = tmp_path / 'blocker'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(
      'import sys\n'
      "for name in ('tensorflow_datasets', 'array_record', 'tensorflow'):\n"
      '  sys.modules[name] = None\n')
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu', PYTHON=sys.executable,
             PYTHONPATH=str(blocker))
  return subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'device_bench.sh'), *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
                        check=False)


def test_device_bench_smoke_runs_tests_and_bench_without_tfds(tmp_path):
  out = device_bench('--smoke', f'--out={tmp_path}/out', tmp_path=tmp_path)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  files = sorted(os.listdir(tmp_path / 'out'))
  assert files == ['cpu-smoke-tests.log', 'cpu-smoke.json', 'cpu-smoke.md'], files
  with open(tmp_path / 'out' / 'cpu-smoke.json') as f:
    saved = json.load(f)
  assert saved['device_tests']['returncode'] == 0 and '1 passed' in saved['device_tests'][
      'summary']
  assert [(r['dtype'], r['label']) for r in saved['rows']] == [
      ('float32', 'ar'), ('float32', 'speculative'), ('bfloat16', 'ar'),
      ('bfloat16', 'speculative')]
  for row in saved['rows']:
    assert row['floor_k_ms'] > 0 and (row['method'] != 'ar' or row['speedup_wall'] == 1.0)
  assert '## On this device' in (tmp_path / 'out' / 'cpu-smoke.md').read_text()


def test_device_bench_refuses_bad_input_in_one_line(tmp_path):
  out = device_bench('--fast', tmp_path=tmp_path)
  assert out.returncode == 2 and out.stderr.strip().splitlines() == [
      'device_bench.sh: error: unknown argument --fast (see --help)']
