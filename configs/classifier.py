"""Stage `classifier`: small Fashion-MNIST CNN, the feature space of bench.py's FID.

  python train.py --config=configs/classifier.py --workdir=runs/fmnist       # 9-12 min, 2 CPUs
  python train.py --config=configs/classifier.py:smoke --workdir=/tmp/smoke  # seconds

Writes <workdir>/classifier/ with results.json (test_accuracy, per class). Needs no other
stage. Expected: 91.6% test accuracy (seed 0; shirt, the hardest class, 76%); bench.py
needs >= 90% for its class accuracy to mean much.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('classifier')
  config.data.num_classes = 10  # Classes of the dataset (the logits).
  config.batch_size = 128
  config.num_steps = 1500  # About 3.2 epochs of the 60k training images.
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.weight_decay = 1e-4
  config.checkpoint_every = 500
  config.flip = True  # Random horizontal flips of the training images.

  config.model = ml_collections.ConfigDict()
  config.model.channels = (32, 64)  # Conv width per stage (each halves the grid).
  config.model.feature_dim = 128  # Width of the penultimate layer (FID's features).
  config.model.patch = 2  # Space-to-depth before the first conv (CPU convs are slow).

  if arg == 'smoke':
    common.smoke(config)
    config.model.channels = (8,)
    config.model.feature_dim = 16
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use configs/classifier.py[:smoke]')
  return config
