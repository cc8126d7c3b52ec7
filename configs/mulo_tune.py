"""MuLo-SD's tau / radius chosen on VALIDATION seeds (never the seeds docs/results.md reports).

  python bench.py --config=configs/mulo_tune.py --out_dir=docs/bench/mulo_tune   # ~25 min
  python bench.py --config=configs/mulo_tune.py --config.checkpoint=<release with other
      mulo stages> --out_dir=...                                   # the same grid on them

bench.py's fidelity job on a grid of MuLo settings, at seed 1000 (noise reference 1001);
the reported benchmark (configs/bench.py) uses seeds 0 and 1. The rule that picks the
defaults (`mulo.Options`) and the stages: the most target passes saved among the settings
whose FID against AR stays within 1.3x the noise level at this image count. 1000 images
(since release v5; 256 before): at 256 the noise level itself spread over [5.9, 8.0], so a
setting near the 1.3x line landed on either side of it from one seed pair to the next.
docs/results.md records the tables this produced and the choice: at 1000 images none of
these three settings nor v1's tau 0.3 / k 8 (and tau 0.1 / k 8) stays within 1.3x
(docs/bench/mulo_tune_1000*/: 2.2-4.0x the noise for 1.09-2.74x fewer passes).
"""

import ml_collections

from configs import bench

# Around the 256-image choice (tau 0.03, k 32, radius 1): radius 0 sat at 1.32-1.41x the
# noise already at 256 images, tau 0.3 saved ~1.1x (docs/bench/mulo_tune/).
TAUS = (0.1, 0.03, 0.01)
SETTINGS = tuple(('mulo', {'tau': t, 'k': 32, 'radius': 1}) for t in TAUS)


def get_config(arg=''):
  config = bench.get_config(arg)
  if arg:  # the smoke variant: two settings, a few images
    config.settings = SETTINGS[:2]
    return config
  config.settings = SETTINGS  # (method, {option: value}) pairs compared with plain AR.
  config.num_images = 1000  # Images per setting (AR at both seeds too).
  config.num_images_by_method = ml_collections.ConfigDict()  # every setting: num_images
  config.seed = 1000  # Validation seeds: not the reported ones (0, 1).
  return config
