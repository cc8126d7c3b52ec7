"""The frozen backbone's own samples as training grids (self-distillation, as in Medusa-2).

Heads draft for the target's samples, not for the dataset's images. Trained on data grids
they meet contexts at decoding time that they never saw: on release v4 the (y+1, x) head
accepts 0.784 of the target's mass on held-out data grids, 0.768 on the target's own
samples (CFG 2), and 0.754 there against the guided p that decoding verifies with.

`source(...)` draws `num` plain AR samples of the backbone once (classes cycled,
temperature 1, the given CFG scale, image i keyed fold_in(key(seed), i) as in `sample.py`)
into `directory` in chunks a rerun resumes at, and returns them as a tokens.TokenSource
({'tokens', 'label'} examples, as the token cache gives). A folder made by another
backbone or setting is refused, never mixed.
"""

import os
import time

import jax
import numpy as np

from ssd_jax.data import tokens as tokens_lib
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.methods import ar
from ssd_jax.training import checkpoint


def source(model, backbone, backbone_spec, num, cfg_scale, seed, directory, batch_size=64,
           chunk_size=1024, log=print):
  """-> tokens.TokenSource of `num` AR samples ([H, W] tokens and the class drawn)."""
  if num < 1 or batch_size < 1 or chunk_size % batch_size:
    raise ValueError(f'self-distillation samples: num={num} and batch_size={batch_size} must '
                     f'be >= 1, chunk_size={chunk_size} a multiple of batch_size.')
  meta = {'backbone': tokens_lib.fingerprint(backbone_spec, backbone), 'grid': list(model.grid),
          'cfg_scale': float(cfg_scale), 'temperature': 1.0, 'seed': int(seed),
          'chunk_size': chunk_size}
  if tokens_lib.read_meta(directory, meta, 'samples', '--config.heads.samples_dir') is None:
    checkpoint.save_json(os.path.join(directory, 'meta.json'), meta)  # process 0 writes

  chunks = range(-(-num // chunk_size))
  path = lambda kind, c: tokens_lib.chunk_path(directory, kind, c)
  missing = [c for c in chunks if not os.path.exists(path('labels', c))
             and c % jax.process_count() == jax.process_index()]
  if missing:
    target = target_lib.Target(model, sampling_lib.Sampling(temperature=1.0,
                                                            cfg_scale=float(cfg_scale)))
    decode = jax.jit(lambda labels, keys: ar.decode_ar(target, backbone, labels, keys)[0])
    drawn_total = -(-num // batch_size) * batch_size
    all_labels = engine.class_labels(drawn_total, model.num_classes)     # classes cycled
    start, drawn = time.time(), 0
    for done, c in enumerate(missing):
      grids, labels = [], []
      for i in range(c * chunk_size, min((c + 1) * chunk_size, drawn_total), batch_size):
        label = all_labels[i:i + batch_size]
        grids.append(np.asarray(decode(label, engine.image_keys(seed, i, batch_size)))
                     .reshape(batch_size, *model.grid))                  # [b, H, W]
        labels.append(label)
      tokens_lib.save_atomic(path('tokens', c), np.concatenate(grids))
      tokens_lib.save_atomic(path('labels', c), np.concatenate(labels))
      drawn += len(labels) * batch_size
      rate = drawn / (time.time() - start)
      log(f'AR samples of the backbone: chunk {done + 1}/{len(missing)} in '
          f'{directory} ({rate:.1f} samples/s, ~{(len(missing) - done - 1) * chunk_size / rate:.0f}'
          ' s left)')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f'self samples {directory}')
  return tokens_lib.TokenSource(directory, num, chunk_size)
