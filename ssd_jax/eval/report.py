"""bench.py's outputs: results.json, results.md (table + how it was made), the plot, samples."""

import json
import math
import os
import platform

import jax
import matplotlib
matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from ssd_jax import images as image_io  # pylint: disable=wrong-import-position
from ssd_jax import pretrained  # pylint: disable=wrong-import-position


def with_interval(value, interval):
  """'11.8 [10.9, 13.0]': three significant digits; the value alone without an interval."""
  def num(x):
    digits = 3 if x == 0 else min(3, max(0, 2 - math.floor(math.log10(abs(x)))))
    return f'{x:.{digits}f}'
  if interval is None:
    return num(value)
  return f'{num(value)} [{num(interval[0])}, {num(interval[1])}]'


def table_columns(summary):
  """(header, row key, format) of the table; intervals named with their level."""
  fid = summary['args']['fid']
  within = f" ({fid['interval']:.0%} interval)" if fid['bootstrap'] else ''
  return (
      ('setting', 'label', '{}'), ('lossless', 'lossless', '{}'),
      ('images', 'num_images', '{:d}'),
      ('passes/batch', 'target_passes_per_batch', '{:.1f}'),
      ('tokens/pass', 'tokens_per_pass', '{:.2f}'),
      ('compile s', 'compile_seconds', '{:.1f}'), ('run s', 'run_seconds', '{:.2f}'),
      ('img/s', 'images_per_second', '{:.2f}'),
      ('speed-up (passes)', 'speedup_passes', '{:.2f}x'),
      ('speed-up (wall)', 'speedup_wall', '{:.2f}x'),
      ('FID vs real', 'fid_real', '{:.3f}'),
      ('FID vs AR' + within, 'fid_ar', lambda r: with_interval(r['fid_ar'],
                                                              r['fid_ar_interval'])),
      ('noise' + within, 'noise_fid', lambda r: with_interval(r['noise_fid'],
                                                             r['noise_interval'])),
      ('FID vs AR / noise', 'fid_ar_over_noise', '{:.2f}'),
      ('class acc', 'class_accuracy', '{:.1%}'), ('NLL bits/token', 'nll_bits', '{:.3f}'),
  )


def machine():
  devices = jax.devices()
  return {'processor': platform.processor() or platform.machine(),
          'platform': platform.platform(), 'jax': jax.__version__,
          'devices': f'{len(devices)} x {devices[0].platform} ({devices[0].device_kind})'}


def relative(path):
  """`path` relative to the repository when it lies inside it (reports travel)."""
  rel = os.path.relpath(os.path.abspath(path), pretrained.REPO_ROOT)
  return path if rel.startswith('..') else rel


def stage_result(stage_dir, key):
  path = os.path.join(stage_dir, 'results.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f).get(key)


def _cell(row, key, fmt):
  if row.get(key) is None:
    return '—'
  return fmt(row) if callable(fmt) else fmt.format(row[key])


def markdown_table(rows, columns):
  """Lines of a markdown table: columns are (header, row key, format); None shows as —.

  A format is a str.format pattern of the value or a function of the whole row.
  """
  lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |', '|' + '---|' * len(columns)]
  return lines + ['| ' + ' | '.join(_cell(r, k, f) for _, k, f in columns) + ' |'
                  for r in rows]


def image_counts(summary):
  """'1000 images for AR (both seeds), ssd; 256 images for sjd, gsd': who made how many."""
  groups = {summary['args']['num_images']: ['AR (both seeds)']}
  for row in summary['rows'][2:]:
    names = groups.setdefault(row['num_images'], [])
    if row['method'] not in names:
      names.append(row['method'])
  return '; '.join(f"{n} images for {', '.join(names)}" for n, names in groups.items())


def row_line(row):
  return (f"{row['label']} ({row['num_images']} images): {row['target_passes']} passes "
          f"({row['tokens_per_pass']:.2f} tokens/pass), {row['run_seconds']:.2f} s, FID vs "
          f"real {row['fid_real']:.3f}, class acc {row['class_accuracy']:.1%}, NLL "
          f"{row['nll_bits']:.3f} bits/token")


def intervals(fid):
  """The header bullet that says what the intervals are."""
  if not fid['bootstrap']:
    return ('- no intervals (`--config.fid.bootstrap=0`); the noise level is itself one '
            'draw, so ratios a little above 1 may be noise.')
  return (f"- intervals ({fid['interval']:.0%}, {fid['bootstrap']} resamples, fixed seed): "
          "the noise level's is the spread of FID between two n-image AR samples (image i of "
          'the two AR runs, which share its class, swapped between them at random); a '
          "row's FID vs AR has a paired bootstrap interval (the same images i of both sets "
          'drawn with replacement, shifted by the bias that duplicated images add, so it is '
          "centred on the value). A FID vs AR above its row's noise interval is more than "
          'sampling noise explains: a fidelity loss; inside it, AR-like at this number of '
          'images.')


def markdown(summary):
  args, m = summary['args'], summary['machine']
  acc = summary['classifier_test_accuracy']
  noise_seed = summary['rows'][1]['seed']
  noise = '; '.join(f"{with_interval(v['fid'], v['interval'])} at {n} images"
                    for n, v in summary['noise_by_images'].items())
  lines = [
      '# Speed and fidelity of the decoding methods', '',
      f"Command: `{summary['command'] or '(library call)'}`", '',
      f"- checkpoint: `{summary['checkpoint']}`; batch {args['batch_size']}, classes "
      f"{args['classes'] or 'all, cycled'}; seed {args['seed']} for every setting, "
      f"{noise_seed} for the AR noise reference",
      f'- images: {image_counts(summary)} (`num_images`, and `num_images_by_method` for the '
      'methods it lists)',
      f"- sampling: {summary['sampling']}",
      f"- machine: {m['processor']}, {m['platform']}, {m['devices']}, jax {m['jax']}",
      f"- FID features: `{summary['features']}` (classifier `{summary['classifier']}`, "
      f"test accuracy {'?' if acc is None else f'{acc:.1%}'}); real reference: "
      f"{summary['num_real_images']} held-out `{summary['real_split']}` images",
      f"- **noise level: FID(AR seed {args['seed']}, AR seed {noise_seed}) = {noise}** "
      '(the first n images of both). A setting with n images is compared with the first n '
      'AR images (image i has the same key in every run: they are an n-image AR run) and '
      'with the noise level at n; at that level (ratio ~1) it is statistically '
      'indistinguishable from AR at n images. FID is biased upward at small n: compare '
      'FID vs real only between rows with the same number of images.',
      intervals(args['fid']),
      '- class acc: share of samples the classifier assigns to the requested class. NLL: '
      'bits/token of the samples under the AR model (teacher forcing, conditional, no CFG, '
      'temperature 1). Speed-ups are against the `ar` row: in target passes per batch '
      'and in images per second.', '']
  lines += markdown_table(summary['rows'], table_columns(summary))
  lines += ['', '![speed-up against FID](speedup_vs_fid.png)', '',
            'samples.png: the first images of each setting, one row per setting, in table '
            'order.', '']
  return '\n'.join(lines)


def plot(summary, path):
  """Speed-up against FID, one labelled point per setting, the noise levels marked."""
  rows = summary['rows']
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  noise = [(v['fid'], f'noise at {n} images (AR vs AR)', v['interval'])
           for n, v in summary['noise_by_images'].items()]
  panels = ((axes[0], 'fid_ar', 'speedup_passes', 'FID vs AR samples',
             'speed-up in target passes', noise),
            (axes[1], 'fid_real', 'speedup_wall', 'FID vs real test images',
             'speed-up in wall time', [(rows[0]['fid_real'], 'AR', None)]))
  for ax, xkey, ykey, xlabel, ylabel, refs in panels:
    for i, row in enumerate(rows):
      if row[xkey] is None:
        continue
      # One colour per setting in both panels; staggered labels so close points stay legible.
      ax.scatter(row[xkey], row[ykey], color=f'C{i % 10}',
                 marker='o' if row['lossless'] else 's')
      ax.annotate(row['label'], (row[xkey], row[ykey]), textcoords='offset points',
                  xytext=(4, 4 - 10 * (i % 3)), fontsize=8, color=f'C{i % 10}')
      if xkey == 'fid_ar' and row['fid_ar_interval']:
        # A bar, not an error bar: the bootstrap interval need not contain the point.
        ax.hlines(row[ykey], *row['fid_ar_interval'], color=f'C{i % 10}', linewidth=1)
    for j, (ref, ref_label, span) in enumerate(refs):
      ax.axvline(ref, color='grey', linestyle=('--', ':', '-.')[j % 3], linewidth=1,
                 label=ref_label)
      if span:
        ax.axvspan(*span, color='grey', alpha=0.1)
    ax.set_xlabel(xlabel + ' (lower is better)')
    ax.set_ylabel(ylabel)
    ax.legend(loc='best', fontsize=8)
    ax.grid(alpha=0.3)
  bars = '; bars and bands: bootstrap intervals' if summary['args']['fid']['bootstrap'] else ''
  fig.suptitle(f'{image_counts(summary)}; circles lossless, squares lossy{bars}', fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_all(out_dir, summary, sample_images, ncols):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(markdown(summary))
  plot(summary, os.path.join(out_dir, 'speedup_vs_fid.png'))
  image_io.save_grid(os.path.join(out_dir, 'samples.png'), sample_images, ncols=ncols)
