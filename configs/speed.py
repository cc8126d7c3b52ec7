"""bench.py's speed mode: ms per target pass against its floor, per method and batch size.

  python bench.py --config=configs/speed.py --out_dir=docs/bench/speed   # ~10 min, 2-core CPU
  python bench.py --config=configs/speed.py --config.batches="((1, 16),)" \
      --config.settings="(('ssd', {'rounds': 2}),)"
  python bench.py --config=configs/speed.py:smoke --out_dir=/tmp/speed   # seconds
  scripts/device_bench.sh                    # on a GPU/TPU: tests, then this in both dtypes

No FID (configs/bench.py measures fidelity too). Each setting is (method, {option: value})
with the method's own option names; plain AR always runs first at every batch size, the
baseline of the speed-ups. Writes results.md (a latency table for batch 1, a throughput
table for the larger batches, per dtype) and results.json.
"""

import ml_collections

from configs import bench

# The fidelity benchmark's settings, SSD at r = 1 only (r changes passes, not their cost).
SETTINGS = tuple(s for s in bench.SETTINGS if s[0] != 'ssd' or s[1] == {'rounds': 1})


def get_config(arg=''):
  config = ml_collections.ConfigDict()
  config.mode = 'speed'  # bench.py's job: speed only (configs/bench.py: speed and fidelity).
  config.checkpoint = ''  # Run folder; '' = the release in checkpoints/fmnist.
  config.settings = SETTINGS  # (method, {option: value}) pairs timed against plain AR.
  config.batches = ((1, 8), (16, 16), (64, 64))  # (batch size, images per timed run) pairs.
  config.repeats = 3  # Timed runs per setting and batch size (and floor); the fastest counts.
  config.repeat_seconds = 10.0  # ... fewer once the timed runs add up to this (1 at least).
  # Loops of 0.2 s read the batch-1 forward at 0.30-0.40 ms from one repeat to the next on
  # the 2-core CPU, loops of 1 s at 0.26-0.28 ms.
  config.floor_seconds = 1.0  # Timed floor loops, all committed lengths together (counts adapt).
  config.dtypes = ('float32',)  # Precisions of the target: float32, bfloat16.
  config.time_limit = 0.0  # Seconds; settings not started by then are listed as skipped.
  config.classes = ()  # Class ids, cycled; () = all classes.
  config.seed = 0  # Seed of every setting (image i uses fold_in(key(seed), i)).

  config.sampling = bench.sampling()  # Temperature 1, CFG 2, as the fidelity benchmark.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = 1  # Devices on the 'data' axis (the first data x model; -1: all).
  config.mesh.model = 1  # Devices on the 'model' axis.
  config.progress = True  # Progress bars.

  if arg == 'smoke':
    config.settings = (('speculative', {}),)
    config.batches = ((1, 1), (2, 2))
    config.repeats = 1
    config.floor_seconds = 0.02
  elif arg:
    raise ValueError(f'configs/speed.py:{arg}: the variants are "" and "smoke".')
  return config
