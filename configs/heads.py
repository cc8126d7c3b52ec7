"""Stage `heads`: SSD neighbour heads distilled against the frozen AR backbone.

  python train.py --config=configs/heads.py --workdir=runs/fmnist     # after tokenizer, ar
  python train.py --config=configs/heads.py:smoke --workdir=/tmp/smoke

Writes <workdir>/heads/ with results.json: per head, top-1 agreement with the backbone's
argmax and the mean acceptance probability sum(min(p, q)) on held-out grids.

Heads see `context` committed positions next to their target (models/heads.py): 2 since
release v2, measured against 0 and 1 on held-out grids (checkpoints/README.md), and with
`chain` (release v4) the token left of their target, so drafts form a chain. Release v2
started from v1's context-free heads (`--config.heads.init_from=<v1 heads>`, 600 steps;
the new inputs start at zero) and trained 1800 steps more; release v4 started from v2's
with `--config.heads.chain=True` (see checkpoints/README.md). From scratch, the defaults
train context chain heads directly.
"""

import ml_collections

from configs import common


def get_config(arg=None):
  config = common.base('heads')
  config.tokenizer_dir = ''  # Trained tokenizer stage; '' = <workdir>/tokenizer.
  config.ar_dir = ''  # Trained AR stage (the frozen backbone); '' = <workdir>/ar.
  config.batch_size = 32
  config.num_steps = 1800  # Release v2's run (after v1's 600 context-free steps, see below).
  config.learning_rate = 1e-3
  config.warmup_steps = 100
  config.log_every = 50
  config.checkpoint_every = 200
  config.data.pretokenize = False  # Tokenize the splits once into tokens_dir, train on that.
  config.data.tokens_dir = ''  # Token cache (with pretokenize); '' = <workdir>/tokens.
  config.data.tokenize_batch = 64  # Images per tokenizer call while tokenizing, per process.
  config.data.tokens_chunk = 4096  # Examples per cache file (the unit a rerun resumes at).

  config.heads = ml_collections.ConfigDict()
  config.heads.num_horizontal = 3  # Heads for (y, x+1..x+k_h) (paper: k_h = 5).
  config.heads.num_vertical = 2  # Heads for (y+1..y+k_v, x) (paper: k_v = 1..2).
  config.heads.mlp_dim = 256  # SwiGLU width inside each head.
  config.heads.ce_weight = 0.5  # Weight of the cross-entropy towards the backbone's p.
  config.heads.null_fraction = 0.25  # Share of null-class grids (CFG drafts need them).
  config.heads.context = 2  # Committed positions next to its target each head also sees.
  config.heads.chain = True  # Heads also see the token left of their target (a draft chain).
  config.heads.init_from = ''  # Heads stage to start from (context inputs start at zero).
  config.heads.cfg_scale = 1.0  # > 1: cross-entropy between CFG-guided p and q (both halves).
  config.heads.samples = 0  # > 0: train on this many AR samples of the backbone, not data.
  config.heads.samples_dir = ''  # Where those samples go; '' = <workdir>/self_samples.
  # Seed of those samples: none the benchmarks draw (0, 1; validation 1000, 1001).
  config.heads.samples_seed = 7777  # Image i is keyed fold_in(key(samples_seed), i).

  if arg == 'smoke':
    common.smoke(config)
    config.heads.mlp_dim = 32
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use configs/heads.py[:smoke]')
  return config
