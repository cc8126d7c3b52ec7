"""Samples images from a trained ssd_jax run (default: the release in checkpoints/fmnist).

  python sample.py --method=ssd --compare_ar --out=samples.png
  python sample.py --method=speculative --temperature=0 --num_images=64 --report=r.json
"""

from absl import app
from absl import flags
import jax

from ssd_jax import runtime
from ssd_jax import sample_job
from ssd_jax.decoding import engine
from ssd_jax.decoding import sjd

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
_SJD_WINDOW = flags.DEFINE_integer('sjd_window', D.sjd_window, 'sjd/gsd: draft window.')
_SJD_INIT = flags.DEFINE_enum('sjd_init', D.sjd_init, sjd.INITS,
                              'sjd/gsd: how new window positions are drafted.')
_GSD_RANKS = flags.DEFINE_integer('gsd_rank_window', D.gsd_rank_window,
                                  'gsd: cluster candidates within +-this many ranks.')
_GSD_PROB = flags.DEFINE_float('gsd_prob_threshold', D.gsd_prob_threshold,
                               'gsd: cluster members have |p(v) - p(x)| below this.')
_GSD_DIST = flags.DEFINE_float('gsd_dist_threshold', D.gsd_dist_threshold,
                               'gsd: ... and squared unit-code distance below this.')
_LANTERN_K = flags.DEFINE_integer('lantern_k', D.lantern_k, 'lantern: latent neighbours.')
_LANTERN_DELTA = flags.DEFINE_float('lantern_delta', D.lantern_delta,
                                    'lantern: most target mass pooled over them.')
_ZIPAR_WINDOW = flags.DEFINE_integer('zipar_window', D.zipar_window, 'zipar: row r+1 starts '
                                     'when row r has this many tokens (0 = half the width).')
_HAWK_LEN = flags.DEFINE_integer('hawk_draft_len', D.hawk_draft_len, 'hawk: horizontal '
                                 'chain length K (a tree of K + K(K+1)/2 drafts).')
_MULO_TAU = flags.DEFINE_float('mulo_tau', D.mulo_tau, 'mulo: keep a draft token when the '
                                'target mass on it and its codebook neighbours is >= this.')
_MULO_K = flags.DEFINE_integer('mulo_k', D.mulo_k, 'mulo: codebook neighbours pooled.')
_MULO_RADIUS = flags.DEFINE_integer('mulo_radius', D.mulo_radius, 'mulo: rejected positions '
                                    'grow by this radius before resampling.')
_MULO_LANES = flags.DEFINE_integer('mulo_lanes', D.mulo_lanes, 'mulo: islands resampled at '
                                   'once (0 = all there can be).')
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
      sjd_window=_SJD_WINDOW.value, sjd_init=_SJD_INIT.value,
      gsd_rank_window=_GSD_RANKS.value, gsd_prob_threshold=_GSD_PROB.value,
      gsd_dist_threshold=_GSD_DIST.value, lantern_k=_LANTERN_K.value,
      lantern_delta=_LANTERN_DELTA.value, zipar_window=_ZIPAR_WINDOW.value,
      hawk_draft_len=_HAWK_LEN.value,
      mulo_tau=_MULO_TAU.value, mulo_k=_MULO_K.value, mulo_radius=_MULO_RADIUS.value,
      mulo_lanes=_MULO_LANES.value,
      checkpoint=_CKPT.value, out=_OUT.value or None, out_dir=_OUT_DIR.value,
      tokens_out=_TOKENS.value, report=_REPORT.value, compare_ar=_COMPARE.value,
      mesh_data=_MESH_DATA.value, mesh_model=_MESH_MODEL.value)
  try:
    report = sample_job.run(args)
  except (ValueError, FileNotFoundError) as e:
    raise app.UsageError(str(e)) from None
  if jax.process_index() == 0:  # with several processes, one reports
    print(sample_job.summary_line(report))


if __name__ == '__main__':
  app.run(main)
