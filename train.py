"""Trains one stage of ssd_jax.

  python train.py --config=configs/tokenizer.py --workdir=runs/fmnist
  python train.py --config=configs/ar.py --workdir=runs/fmnist --config.num_steps=20000

Each stage writes into <workdir>/<stage>/ and resumes from its newest checkpoint when rerun.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from ssd_jax import runtime
from ssd_jax.training import stages

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Stage config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run folder; each stage uses a subfolder.')
flags.mark_flags_as_required(['config', 'workdir'])


def fail(message):
  """One line naming the problem, exit code 2; no help dump, no traceback."""
  print(f'train.py: error: {message} (see --help)', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback' in message:  # an error inside the config file: keep its last line
      message = f'{message.split(": ")[0]}: {message.strip().splitlines()[-1]}'
    fail(message)
  except AttributeError as e:  # config_flags' answer to --config.<a field it lacks>=...
    fail(f'a --config.* flag names a field the config does not have: {str(e).strip(chr(34))}')


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {argv[1:]}')
  runtime.setup()
  runtime.quiet_logs()
  try:
    stages.run(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:  # how ssd_jax refuses bad input, with the fix
    fail(e)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
