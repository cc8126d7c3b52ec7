"""Stage `ar`: class-conditional AR transformer on the tokenizer's 14x14 grids.

  python train.py --config=configs/ar.py --workdir=runs/fmnist      # after configs/tokenizer.py
  python train.py --config=configs/ar.py:smoke --workdir=/tmp/smoke  # seconds

Reads the frozen tokenizer from <workdir>/tokenizer (or --config.tokenizer_dir) and writes
<workdir>/ar/ (checkpoints, metrics, results.json with validation bits/token, samples.png
with one row of plain-AR samples per class).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('ar')
  config.tokenizer_dir = ''  # Trained tokenizer stage; '' = <workdir>/tokenizer.
  config.data.num_classes = 10  # Classes of the dataset (one more, the null class, for CFG).
  config.batch_size = 32
  config.num_steps = 1800  # ~80 min at ~0.4 steps/s on 2 CPU cores (the release run).
  config.learning_rate = 1e-3
  config.warmup_steps = 150
  config.weight_decay = 0.05
  config.log_every = 50
  config.checkpoint_every = 250
  config.sample_cfg_scale = 2.0  # CFG scale of the sample grid written at the end.
  config.samples_per_class = 10  # Columns of that grid.

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 4  # Transformer blocks.
  config.model.dim = 192  # Model width.
  config.model.num_heads = 6  # Attention heads (head_dim = dim / num_heads, multiple of 4).
  config.model.mlp_dim = 512  # SwiGLU hidden width.
  config.model.prefix_len = 1  # Condition tokens before the image (1 class embedding).
  config.model.rope_base = 100.0  # Axial 2D RoPE base (grids are small).
  config.model.label_dropout = 0.1  # Probability of the null class in training (for CFG).

  if arg == 'smoke':
    common.smoke(config)
    config.model.num_layers = 1
    config.model.dim = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.samples_per_class = 1
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use configs/ar.py[:smoke]')
  return config
