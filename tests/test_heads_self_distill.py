"""Heads trained for what decoding asks of them: the backbone's own samples as training grids
(self-distillation) and the CFG-guided distributions the engine verifies with."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.decoding.methods import ar
from ssd_jax.training import heads_stage
from ssd_jax.training import self_samples

VOCAB, GRID = 8, (3, 4)


@pytest.fixture(scope='module')
def tiny():
  return helpers.heads_bundle(VOCAB, GRID, seed=3, sharpen=2.0, context=2, chain=True)


def test_samples_are_the_backbones_and_resume(tiny, tmp_path):
  """The grids are exactly plain AR's samples (same keys, classes cycled, CFG), chunked on
  disk; a lost chunk is drawn again identically; other settings are refused."""
  model, params = tiny.model, tiny.params
  directory, logs = str(tmp_path / 'samples'), []
  make = lambda cfg, log=logs.append: self_samples.source(
      model, params, {'w': 1}, 20, cfg, 5, directory, batch_size=4, chunk_size=8, log=log)
  got = make(2.0).arrays()
  assert got['tokens'].shape == (20,) + GRID and len(logs) == 3
  # sample.py's classes and keys for images 0..19 at seed 5.
  labels = engine.class_labels(20, model.num_classes)
  target = target_lib.Target(model, sampling_lib.Sampling(temperature=1.0, cfg_scale=2.0))
  want, _ = ar.decode_ar(target, params, labels, engine.image_keys(5, 0, 20))
  np.testing.assert_array_equal(got['tokens'].reshape(20, -1), want)
  np.testing.assert_array_equal(got['label'], labels)

  os.remove(os.path.join(directory, 'labels-00001.npy'))
  again = make(2.0).arrays()
  assert len(logs) == 4  # one chunk drawn again
  np.testing.assert_array_equal(again['tokens'], got['tokens'])
  with pytest.raises(ValueError, match='cfg_scale: 2.0 there, 3.0 here.*samples_dir'):
    make(3.0)


def test_guided_losses_and_acceptance_are_the_engines(tiny):
  """With cfg_scale > 1 the cross-entropy and `acceptance_cfg` use p and q guided exactly as
  the engine guides them (cond group first): a swapped or unguided pair fails."""
  model, stage = tiny.model, tiny.stage('heads')
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (6, 12)), jnp.int32)
  labels = jnp.asarray(rng.integers(0, model.num_classes, 6), jnp.int32)
  scale = 3.0
  target = target_lib.Target(model, sampling_lib.Sampling(temperature=1.0, cfg_scale=scale))

  # The engine's view: guided p from both groups' logits, q from both groups' drafts.
  halves = [heads_stage.head_outputs(model, stage.module, tiny.params, stage.params, tokens,
                                     jnp.full_like(labels, c) if c is not None else labels)
            for c in (None, model.null_class)]
  q = target.draft_probs(tiny.params, jnp.stack([h[0] for h in halves]))     # [B, N, K, V]
  p = target.draft_probs(tiny.params, jnp.stack([h[1] for h in halves]))
  valid = np.broadcast_to(np.asarray(halves[0][2])[None], q.shape[:3])
  ce_want = np.sum(-np.sum(p * np.log(q), -1) * valid) / valid.sum()
  _, ce = heads_stage.distill_losses(model, stage.module, tiny.params, stage.params, tokens,
                                     labels, scale)
  np.testing.assert_allclose(ce, ce_want, rtol=1e-4)
  _, ce_plain = heads_stage.distill_losses(model, stage.module, tiny.params, stage.params,
                                           tokens, labels)
  assert abs(float(ce_plain) - ce_want) > 1e-3  # the guided loss is another quantity

  results = heads_stage.evaluate_heads(model, stage.module, tiny.params, stage.params,
                                       lambda batch: batch['tokens'],
                                       {'tokens': tokens, 'label': labels}, batch_size=4,
                                       cfg_scale=scale)
  accept = np.sum(np.minimum(p, q), -1)                                      # [B, N, K]
  for k, name in enumerate(heads_stage.head_names(stage.module)):
    want = np.sum(accept[..., k] * valid[..., k]) / valid[..., k].sum()
    assert results[name]['acceptance_cfg'] == pytest.approx(float(want), rel=1e-4)
