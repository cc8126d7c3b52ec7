"""Stage `mulo_draft`: MuLo-SD's low-resolution drafter, AR on 7x7 pooled token grids.

  python train.py --config=configs/mulo_draft.py --workdir=runs/fmnist     # after tokenizer
  python train.py --config=configs/mulo_draft.py:smoke --workdir=/tmp/smoke

Reads the frozen tokenizer from <workdir>/tokenizer; the target AR model is not needed.
Writes <workdir>/mulo_draft/ with results.json (validation bits/token of the pooled grids)
and samples.png (7x7 samples decoded as 14x14 previews, one row per class, CFG 2).
Measured (the release: 600 steps, 18 min at nice 10 on 2 CPU cores shared with the AR run
and the test suite, 0.3-0.55 steps/s): held-out 3.91 bits/token on the 7x7 pooled grids;
a 1200-step run reached 3.80.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('mulo_draft')
  config.tokenizer_dir = ''  # Trained tokenizer stage; '' = <workdir>/tokenizer.
  config.data.num_classes = 10  # Classes of the dataset (one more, the null class, for CFG).
  config.factor = 2  # Pooling factor: 14x14 grids -> 7x7 (the upsampler must use the same).
  config.batch_size = 64
  config.num_steps = 600  # ~0.6 epoch (the release run; 2 CPU cores shared with other runs).
  config.learning_rate = 2e-3
  config.warmup_steps = 100
  config.weight_decay = 0.05
  config.log_every = 50
  config.checkpoint_every = 200
  config.data.pretokenize = False  # Tokenize the splits once into tokens_dir, train on that.
  config.data.tokens_dir = ''  # Token cache (with pretokenize); '' = <workdir>/tokens.
  config.data.tokenize_batch = 64  # Images per tokenizer call while tokenizing, per process.
  config.data.tokens_chunk = 4096  # Examples per cache file (the unit a rerun resumes at).
  config.sample_cfg_scale = 2.0  # CFG scale of the sample grid written at the end.
  config.samples_per_class = 10  # Columns of that grid (0 = no grid: 1000 classes).

  config.model = ml_collections.ConfigDict()
  config.model.num_layers = 3  # Transformer blocks (the drafter must be cheap).
  config.model.dim = 128  # Model width.
  config.model.num_heads = 4  # Attention heads (head_dim = dim / num_heads, multiple of 4).
  config.model.mlp_dim = 384  # SwiGLU hidden width.
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
    raise ValueError(f'unknown config variant {arg!r}; use configs/mulo_draft.py[:smoke]')
  return config
