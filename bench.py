"""Speed and fidelity of decoding methods on one checkpoint (same classes, same seeds).

  python bench.py --config=configs/bench.py --out_dir=docs/bench
  python bench.py --config=configs/bench.py --config.num_images=256 \
      --config.settings="(('ssd', {'rounds': 3}),)"
  python bench.py --config=configs/bench.py:smoke --out_dir=/tmp/bench
  python bench.py --config=configs/speed.py --out_dir=docs/bench/speed    # speed only

configs/bench.py (mode 'fidelity') writes results.md, results.json, speedup_vs_fid.png and
samples.png into --out_dir; configs/speed.py (mode 'speed': ms per pass against the floor
of a bare forward, per batch size, no FID) writes results.md and results.json. What runs is
data: the configs list the settings as (method, {option: value}).
"""

import importlib
import shlex
import sys

import jax
from ml_collections import config_flags

from ssd_jax import cli
from ssd_jax import runtime

# config.mode -> the job's module, imported on use: the speed mode runs where the data
# pipeline's tensorflow-datasets is not installed (accelerator images).
JOBS = {'fidelity': 'ssd_jax.bench_job', 'speed': 'ssd_jax.speed_bench'}

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bench.py',
                                          'Benchmark config file.', lock_config=True)
_OUT_DIR = cli.flags.DEFINE_string('out_dir', 'bench', 'Folder for the outputs.')


def main(argv):
  del argv
  runtime.setup()
  runtime.quiet_logs()
  cli.check_writable(_OUT_DIR.value, 'out_dir', folder=True)
  command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
  mode = _CONFIG.value.get('mode', 'fidelity')
  if mode not in JOBS:
    raise ValueError(f'--config.mode={mode!r} must be one of {", ".join(JOBS)}.')
  job = importlib.import_module(JOBS[mode])
  summary = job.run(_CONFIG.value, _OUT_DIR.value, command)
  if jax.process_index() == 0:  # with several processes, one reports
    print(job.summary_line(summary, _OUT_DIR.value))


if __name__ == '__main__':
  cli.run(main)
