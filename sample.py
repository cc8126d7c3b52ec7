"""Samples images from a trained ssd_jax run (default: the release in checkpoints/fmnist).

  python sample.py --method=ssd --compare_ar --out=samples.png
  python sample.py --method=speculative --temperature=0 --num_images=64 --report=r.json
  python sample.py --method=ssd --ssd_rounds=2 --ssd_draft_len=6

Each method's knobs are flags --<method>_<field>, listed by --help.
"""

import jax

from ssd_jax import cli
from ssd_jax import runtime
from ssd_jax import sample_job
from ssd_jax.decoding import registry

_ARGS = cli.define_flags(sample_job.SampleArgs, skip=('method', 'classes'))
_METHOD = cli.flags.DEFINE_enum(
    'method', sample_job.SampleArgs.method, registry.names(),
    'Decoding method: ' + '; '.join(f'{m.name} ({m.summary})'
                                    for m in registry.all_methods()))
_CLASSES = cli.flags.DEFINE_list('classes', None, sample_job.SampleArgs.__dataclass_fields__[
    'classes'].metadata['doc'])
_KNOBS = cli.define_method_flags()
for _name in _ARGS + _KNOBS:  # defined in ssd_jax/cli.py; listed by this script's --help
  cli.flags.declare_key_flag(_name)


def main(argv):
  del argv
  runtime.setup()
  runtime.quiet_logs()
  try:
    classes = [int(c) for c in _CLASSES.value] if _CLASSES.value else None
  except ValueError:
    raise ValueError(f'--classes={",".join(_CLASSES.value)} must be comma-separated '
                     'integers.') from None
  args = cli.read(sample_job.SampleArgs, method=_METHOD.value, classes=classes,
                  options=cli.method_options(_METHOD.value))
  args.out = args.out or None
  report = sample_job.run(args)
  if jax.process_index() == 0:  # with several processes, one reports
    print(sample_job.summary_line(report))


if __name__ == '__main__':
  cli.run(main)
