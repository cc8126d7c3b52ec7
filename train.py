"""Trains one stage of ssd_jax.

  python train.py --config=configs/tokenizer.py --workdir=runs/fmnist
  python train.py --config=configs/ar.py --workdir=runs/fmnist --config.num_steps=20000

Each stage writes into <workdir>/<stage>/ and resumes from its newest checkpoint when rerun.
"""

from absl import flags
from ml_collections import config_flags

from ssd_jax import cli
from ssd_jax import runtime
from ssd_jax.training import stages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; each stage uses a subfolder.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  runtime.setup()
  runtime.quiet_logs()
  stages.run(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  cli.run(main)
