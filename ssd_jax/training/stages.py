"""train.py's entry point: picks the stage named by the config and runs the shared loop."""

import importlib
import os

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
    raise ValueError(f'--config.stage={config.stage!r} is not a stage; choose one of '
                     f'{sorted(STAGES)}.')
  _make_stage_dir(workdir, config.stage)
  module = importlib.import_module(STAGES[config.stage])
  return loop.train(config, workdir, module.make_stage(config, workdir))


def _make_stage_dir(workdir, stage):
  """Creates <workdir>/<stage> first, so a --workdir that cannot hold it costs no work."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ValueError(f'--workdir={workdir} is a file; give a folder (it is created if '
                     'missing).')
  stage_dir = os.path.join(workdir, stage)
  try:
    os.makedirs(stage_dir, exist_ok=True)
  except OSError as e:
    raise ValueError(f'--workdir={workdir}: cannot create {stage_dir} ({e.strerror}).') from e
  if not os.access(stage_dir, os.W_OK):
    raise ValueError(f'--workdir={workdir}: {stage_dir} is not writable.')
