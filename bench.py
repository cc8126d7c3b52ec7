"""Speed and fidelity of decoding methods on one checkpoint (same classes, same seeds).

  python bench.py --methods=ar,speculative,ssd --ssd_rounds=0,1,2 --num_images=1000 \
      --out_dir=docs/bench
  python bench.py --methods=speculative --options=draft_len=6 --setting=ssd:ssd_rounds=3,draft_len=2
  python bench.py --features=my_inception.py:make --features_path=/data/inception.npz

Writes results.md, results.json, speedup_vs_fid.png and samples.png into --out_dir. Any
field of ssd_jax.decoding.engine.Options can be set for all settings (--options) or for
one extra setting (--setting=METHOD:key=value,...; repeat the flag for more).
"""

import shlex
import sys

from absl import app
from absl import flags
import jax

from ssd_jax import bench_job
from ssd_jax import runtime
from ssd_jax.decoding import engine

D = bench_job.BenchArgs()
_METHODS = flags.DEFINE_list('methods', list(D.methods), 'Methods to compare (ar always runs '
                             'as the baseline): ' + ', '.join(engine.METHODS))
_ROUNDS = flags.DEFINE_list('ssd_rounds', [], 'ssd: one setting per value of ssd_rounds.')
_OPTIONS = flags.DEFINE_list('options', [], 'key=value engine options for every setting.')
_SETTING = flags.DEFINE_multi_string('setting', [], 'Extra setting METHOD:key=value,... '
                                     '(repeatable).')
_NUM = flags.DEFINE_integer('num_images', D.num_images, 'Images per setting.')
_BATCH = flags.DEFINE_integer('batch_size', D.batch_size, 'Images per decoding batch.')
_CLASSES = flags.DEFINE_list('classes', None, 'Class ids, cycled (default: all).')
_CFG = flags.DEFINE_float('cfg_scale', D.cfg_scale, 'Classifier-free guidance (1 = off).')
_TEMP = flags.DEFINE_float('temperature', D.temperature, 'Sampling temperature (0 = greedy).')
_TOPK = flags.DEFINE_integer('top_k', D.top_k, 'Top-k filter (0 = off).')
_TOPP = flags.DEFINE_float('top_p', D.top_p, 'Top-p filter (1 = off).')
_SEED = flags.DEFINE_integer('seed', D.seed, 'Seed of every setting.')
_NOISE_SEED = flags.DEFINE_integer('noise_seed', None, 'Seed of the second AR sample (the '
                                   'noise reference); default seed + 1.')
_CKPT = flags.DEFINE_string('checkpoint', None, 'Run folder (default: checkpoints/fmnist).')
_CLASSIFIER = flags.DEFINE_string('classifier', None, 'Classifier stage folder (default: '
                                  '<checkpoint>/classifier).')
_FEATURES = flags.DEFINE_string('features', D.features, 'FID features: classifier, '
                                'pkg.module:factory or file.py:factory.')
_FEATURES_PATH = flags.DEFINE_string('features_path', None, 'Passed to the factory (weights).')
_DATA_NAME = flags.DEFINE_string('data_name', D.data_name, 'tfds dataset of the real images.')
_DATA_DIR = flags.DEFINE_string('data_dir', D.data_dir, 'tfds data_dir ("" = default).')
_IDX_DIR = flags.DEFINE_string('idx_dir', D.idx_dir, 'Fashion-MNIST IDX folder ("" = default).')
_SPLIT = flags.DEFINE_string('real_split', D.real_split, 'Split of the real images.')
_NUM_REAL = flags.DEFINE_integer('num_real', D.num_real, 'Real images for FID (at most).')
_OUT_DIR = flags.DEFINE_string('out_dir', D.out_dir, 'Folder for the outputs.')
_MESH_DATA = flags.DEFINE_integer('mesh_data', -1, 'Devices on the data axis (-1: all).')
_MESH_MODEL = flags.DEFINE_integer('mesh_model', 1, 'Devices on the model axis.')


def _ints(name, values):
  try:
    return [int(v) for v in values] if values else values
  except ValueError as e:
    raise app.UsageError(f'--{name} must be comma-separated integers: {e}') from e


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runtime.setup()
  runtime.quiet_logs()
  args = bench_job.BenchArgs(
      methods=_METHODS.value, ssd_rounds=_ints('ssd_rounds', _ROUNDS.value),
      options=_OPTIONS.value, settings=_SETTING.value, num_images=_NUM.value,
      batch_size=_BATCH.value, classes=_ints('classes', _CLASSES.value),
      cfg_scale=_CFG.value, temperature=_TEMP.value, top_k=_TOPK.value, top_p=_TOPP.value,
      seed=_SEED.value, noise_seed=_NOISE_SEED.value, checkpoint=_CKPT.value,
      classifier=_CLASSIFIER.value, features=_FEATURES.value,
      features_path=_FEATURES_PATH.value, data_name=_DATA_NAME.value,
      data_dir=_DATA_DIR.value, idx_dir=_IDX_DIR.value, real_split=_SPLIT.value,
      num_real=_NUM_REAL.value, out_dir=_OUT_DIR.value, mesh_data=_MESH_DATA.value,
      mesh_model=_MESH_MODEL.value,
      command=' '.join(['python'] + [shlex.quote(a) for a in sys.argv]))
  try:
    summary = bench_job.run(args)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  if jax.process_index() == 0:  # with several processes, one reports
    print(f"noise level (AR vs AR, another seed): FID {summary['noise_fid']:.3f}; wrote "
          f'{args.out_dir}/results.md, results.json, speedup_vs_fid.png, samples.png')


if __name__ == '__main__':
  app.run(main)
