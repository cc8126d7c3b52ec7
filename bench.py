"""Speed and fidelity of decoding methods on one checkpoint (same classes, same seeds).

  python bench.py --config=configs/bench.py --out_dir=docs/bench
  python bench.py --config=configs/bench.py --config.num_images=1000 \
      --config.settings="(('ssd', {'rounds': 3}),)"
  python bench.py --config=configs/bench.py:smoke --out_dir=/tmp/bench

Writes results.md, results.json, speedup_vs_fid.png and samples.png into --out_dir. What
runs is data: configs/bench.py lists the settings as (method, {option: value}).
"""

import shlex
import sys

import jax
from ml_collections import config_flags

from ssd_jax import bench_job
from ssd_jax import cli
from ssd_jax import runtime

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/bench.py',
                                          'Benchmark config file.', lock_config=True)
_OUT_DIR = cli.flags.DEFINE_string('out_dir', 'bench', 'Folder for the outputs.')


def main(argv):
  del argv
  runtime.setup()
  runtime.quiet_logs()
  cli.check_writable(_OUT_DIR.value, 'out_dir', folder=True)
  command = ' '.join(['python'] + [shlex.quote(a) for a in sys.argv])
  summary = bench_job.run(_CONFIG.value, _OUT_DIR.value, command)
  if jax.process_index() == 0:  # with several processes, one reports
    print(f"noise level (AR vs AR, another seed): FID {summary['noise_fid']:.3f}; wrote "
          f'{_OUT_DIR.value}/results.md, results.json, speedup_vs_fid.png, samples.png')


if __name__ == '__main__':
  cli.run(main)
