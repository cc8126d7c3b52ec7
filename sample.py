"""Samples images from a trained ssd_jax run (default: the release in checkpoints/fmnist).

  python sample.py --method=ssd --compare_ar --out=samples.png
  python sample.py --method=speculative --temperature=0 --num_images=64 --report=r.json
"""

from absl import app
from absl import flags

from ssd_jax import runtime
from ssd_jax import sample_job
from ssd_jax.decoding import engine

D = sample_job.SampleArgs()
_METHOD = flags.DEFINE_string('method', D.method, 'One of: ' + ', '.join(
    f'{k} ({m.summary})' for k, m in engine.METHODS.items()))
_NUM = flags.DEFINE_integer('num_images', D.num_images, 'Images to sample.')
_BATCH = flags.DEFINE_integer('batch_size', D.batch_size, 'Images per decoding batch.')
_CLASSES = flags.DEFINE_list('classes', None, 'Comma list of class ids, cycled (default: '
                             'all classes cycled).')
_CFG = flags.DEFINE_float('cfg_scale', D.cfg_scale, 'Classifier-free guidance (1 = off).')
_TEMP = flags.DEFINE_float('temperature', D.temperature, 'Sampling temperature (0 = greedy).')
_TOPK = flags.DEFINE_integer('top_k', D.top_k, 'Top-k filter (0 = off).')
_TOPP = flags.DEFINE_float('top_p', D.top_p, 'Top-p (nucleus) filter (1 = off).')
_SEED = flags.DEFINE_integer('seed', D.seed, 'Image i uses key fold_in(key(seed), i).')
_ROUNDS = flags.DEFINE_integer('ssd_rounds', D.ssd_rounds, 'ssd: verify rounds per row.')
_DRAFT = flags.DEFINE_integer('draft_len', D.draft_len, 'Drafts verified per pass.')
_CKPT = flags.DEFINE_string('checkpoint', None, 'Run folder (default: checkpoints/fmnist).')
_OUT = flags.DEFINE_string('out', D.out, 'PNG grid of all images ("" = none).')
_OUT_DIR = flags.DEFINE_string('out_dir', None, 'Folder for one PNG per image.')
_TOKENS = flags.DEFINE_string('tokens_out', None, '.npy of the token grids [N, H, W].')
_REPORT = flags.DEFINE_string('report', None, 'JSON report path.')
_COMPARE = flags.DEFINE_bool('compare_ar', False, 'Also run plain AR on the same classes '
                             'and seeds and report the speed-up.')
_MESH_DATA = flags.DEFINE_integer('mesh_data', -1, 'Devices on the data axis (-1: all).')
_MESH_MODEL = flags.DEFINE_integer('mesh_model', 1, 'Devices on the model axis.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  runtime.setup()
  runtime.quiet_logs()
  try:
    classes = [int(c) for c in _CLASSES.value] if _CLASSES.value else None
  except ValueError as e:
    raise app.UsageError(f'--classes must be comma-separated integers: {e}') from e
  args = sample_job.SampleArgs(
      method=_METHOD.value, num_images=_NUM.value, batch_size=_BATCH.value, classes=classes,
      cfg_scale=_CFG.value, temperature=_TEMP.value, top_k=_TOPK.value, top_p=_TOPP.value,
      seed=_SEED.value, ssd_rounds=_ROUNDS.value, draft_len=_DRAFT.value,
      checkpoint=_CKPT.value, out=_OUT.value or None, out_dir=_OUT_DIR.value,
      tokens_out=_TOKENS.value, report=_REPORT.value, compare_ar=_COMPARE.value,
      mesh_data=_MESH_DATA.value, mesh_model=_MESH_MODEL.value)
  try:
    report = sample_job.run(args)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  print(sample_job.summary_line(report))


if __name__ == '__main__':
  app.run(main)
