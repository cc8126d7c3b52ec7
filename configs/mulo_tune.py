"""MuLo-SD's tau / radius chosen on VALIDATION seeds (never the seeds docs/results.md reports).

  python bench.py --config=configs/mulo_tune.py --out_dir=docs/bench/mulo_tune   # ~45 min

bench.py's fidelity job on a grid of MuLo settings, at seed 1000 (noise reference 1001);
the reported benchmark (configs/bench.py) uses seeds 0 and 1. The rule that picks the
defaults (`mulo.Options`): the most target passes saved among the settings whose FID
against AR stays within 1.3x the noise level at this image count. docs/results.md records
the table this produced and the choice.
"""

import ml_collections

from configs import bench

TAUS = (0.3, 0.1, 0.03)
RADII = (0, 1)
# The grid, then two settings past its most aggressive AR-like corner (tau 0.03, radius 1).
SETTINGS = tuple(('mulo', {'tau': t, 'radius': r}) for r in RADII for t in TAUS) + (
    ('mulo', {'tau': 0.01, 'radius': 1}), ('mulo', {'tau': 0.03, 'radius': 1, 'k': 32}))


def get_config(arg=''):
  config = bench.get_config(arg)
  if arg:  # the smoke variant: two settings, a few images
    config.settings = SETTINGS[:2]
    return config
  config.settings = SETTINGS  # (method, {option: value}) pairs compared with plain AR.
  config.num_images = 256  # Images per setting (AR at both seeds too).
  config.num_images_by_method = ml_collections.ConfigDict()  # every setting: num_images
  config.seed = 1000  # Validation seeds: not the reported ones (0, 1).
  return config
