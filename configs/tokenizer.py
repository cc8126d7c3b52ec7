"""Stage `tokenizer`: VQ tokenizer for Fashion-MNIST, 28x28 images -> 14x14 token grids.

  python train.py --config=configs/tokenizer.py --workdir=runs/fmnist
  python train.py --config=configs/tokenizer.py:smoke --workdir=/tmp/smoke   # seconds

Writes <workdir>/tokenizer/ (checkpoints, config.json, metrics.jsonl, results.json,
reconstructions.png). Expected: see README "Results" (test PSNR and codebook use).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('tokenizer')
  config.num_steps = 2400  # ~20 min at 2.2 steps/s on 2 CPU cores (test PSNR ~31 dB).
  config.learning_rate = 2e-3
  config.warmup_steps = 200
  config.checkpoint_every = 500

  config.vq = ml_collections.ConfigDict()
  config.vq.codebook_size = 512  # Number of codes (the AR model's vocabulary).
  config.vq.code_dim = 16  # Dimension of the l2-normalised codes (cosine lookup).
  config.vq.channels = 32  # Conv width; 64 runs 4-8x slower on CPU.
  config.vq.num_res_blocks = 2  # Residual blocks in the encoder and in the decoder.
  config.vq.factor = 2  # Downsampling factor: 28x28 images -> 14x14 tokens.
  config.vq.commitment = 0.25  # Weight of the commitment loss |z - sg(e)|^2.
  config.vq.codebook_weight = 1.0  # Weight of the codebook loss |sg(z) - e|^2.
  config.vq.restart_every = 150  # Steps between restarts of codes unused since the last.

  if arg == 'smoke':
    common.smoke(config)
    config.vq.codebook_size = 64
    config.vq.channels = 8
    config.vq.num_res_blocks = 1
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use configs/tokenizer.py[:smoke]')
  return config
