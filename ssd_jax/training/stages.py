"""train.py's entry point: picks the stage named by the config and runs the shared loop."""

import importlib

from ssd_jax.training import loop

# stage name -> module with make_stage(config, workdir) (imported lazily: each is heavy).
STAGES = {
    'tokenizer': 'ssd_jax.training.tokenizer_stage',
    'ar': 'ssd_jax.training.ar_stage',
    'heads': 'ssd_jax.training.heads_stage',
    'classifier': 'ssd_jax.training.classifier_stage',
    'hawk_draft': 'ssd_jax.training.hawk_stage',
    'mulo_draft': 'ssd_jax.training.mulo_stages',
    'mulo_upsampler': 'ssd_jax.training.mulo_stages',
}


def run(config, workdir):
  if config.stage not in STAGES:
    raise ValueError(f'unknown stage {config.stage!r}; choose one of {sorted(STAGES)}')
  module = importlib.import_module(STAGES[config.stage])
  return loop.train(config, workdir, module.make_stage(config, workdir))
