"""Stage `mulo_upsampler`: MuLo-SD's learned upsampler, 7x7 pooled grids -> 14x14 tokens.

  python train.py --config=configs/mulo_upsampler.py --workdir=runs/fmnist  # after tokenizer
  python train.py --config=configs/mulo_upsampler.py:smoke --workdir=/tmp/smoke

Reads the frozen tokenizer from <workdir>/tokenizer; trains on real grids (pooled input,
real 14x14 grid as the target), so it needs neither the drafter nor the target AR model.
Writes <workdir>/mulo_upsampler/ with results.json (held-out token accuracy of the argmax
against the real grid, the same for copying each pooled token to its 2x2 block, bits/token,
PSNR of the decoded upsampled grid) and upsampled.png (rows: tokenizer reconstruction,
pooled copy, upsampled). Measured (the release: 500 steps, 7 min on 2 CPU cores shared
with the AR run, 1.27 steps/s): held-out token accuracy 0.28 (copying the pooled token:
0.10), 4.31 bits/token, upsampled PSNR 19.8 dB (the tokenizer's own reconstruction:
31.4 dB).
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('mulo_upsampler')
  config.tokenizer_dir = ''  # Trained tokenizer stage; '' = <workdir>/tokenizer.
  config.data.num_classes = 10  # Classes of the dataset (one more, the null class, for CFG).
  config.factor = 2  # Pooling factor of the low-res grid (the drafter's config.factor).
  config.batch_size = 64
  config.num_steps = 500  # ~0.5 epoch (the release run; 2 CPU cores shared with other runs).
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.weight_decay = 0.05
  config.log_every = 50
  config.checkpoint_every = 200
  config.data.pretokenize = False  # Tokenize the splits once into tokens_dir, train on that.
  config.data.tokens_dir = ''  # Token cache (with pretokenize); '' = <workdir>/tokens.
  config.data.tokenize_batch = 64  # Images per tokenizer call while tokenizing, per process.
  config.data.tokens_chunk = 4096  # Examples per cache file (the unit a rerun resumes at).

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 2  # Non-causal transformer blocks.
  config.model.dim = 128  # Model width.
  config.model.num_heads = 4  # Attention heads (head_dim = dim / num_heads, multiple of 4).
  config.model.mlp_dim = 256  # SwiGLU hidden width.
  config.model.rope_base = 100.0  # Axial 2D RoPE base.
  config.model.label_dropout = 0.1  # Probability of the null class in training (for CFG).

  if arg == 'smoke':
    common.smoke(config)
    config.model.num_layers = 1
    config.model.dim = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use configs/mulo_upsampler.py[:smoke]')
  return config
