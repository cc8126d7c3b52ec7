"""bench.py's outputs: results.json, results.md (table + how it was made), the plot, samples."""

import json
import os
import platform

import jax
import matplotlib
matplotlib.use('Agg')  # files only; no display on servers
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from ssd_jax import images as image_io  # pylint: disable=wrong-import-position
from ssd_jax import pretrained  # pylint: disable=wrong-import-position

COLUMNS = (  # (header, row key, format)
    ('setting', 'label', '{}'), ('lossless', 'lossless', '{}'),
    ('target passes', 'target_passes', '{:d}'), ('tokens/pass', 'tokens_per_pass', '{:.2f}'),
    ('compile s', 'compile_seconds', '{:.1f}'), ('run s', 'run_seconds', '{:.2f}'),
    ('img/s', 'images_per_second', '{:.2f}'),
    ('speed-up (passes)', 'speedup_passes', '{:.2f}x'),
    ('speed-up (wall)', 'speedup_wall', '{:.2f}x'),
    ('FID vs real', 'fid_real', '{:.3f}'), ('FID vs AR', 'fid_ar', '{:.3f}'),
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
  return '—' if row.get(key) is None else fmt.format(row[key])


def markdown_table(rows, columns):
  """Lines of a markdown table: columns are (header, row key, format); None shows as —."""
  lines = ['| ' + ' | '.join(c[0] for c in columns) + ' |', '|' + '---|' * len(columns)]
  return lines + ['| ' + ' | '.join(_cell(r, k, f) for _, k, f in columns) + ' |'
                  for r in rows]


def row_line(row):
  return (f"{row['label']}: {row['target_passes']} passes ({row['tokens_per_pass']:.2f} "
          f"tokens/pass), {row['run_seconds']:.2f} s, FID vs real {row['fid_real']:.3f}, "
          f"class acc {row['class_accuracy']:.1%}, NLL {row['nll_bits']:.3f} bits/token")


def markdown(summary):
  args, m = summary['args'], summary['machine']
  acc = summary['classifier_test_accuracy']
  noise_seed = summary['rows'][1]['seed']
  lines = [
      '# Speed and fidelity of the decoding methods', '',
      f"Command: `{summary['command'] or '(library call)'}`", '',
      f"- checkpoint: `{summary['checkpoint']}`; {args['num_images']} images per setting "
      f"(batch {args['batch_size']}), classes {args['classes'] or 'all, cycled'}; seed "
      f"{args['seed']} for every setting, {noise_seed} for the AR noise reference",
      f"- sampling: {summary['sampling']}",
      f"- machine: {m['processor']}, {m['platform']}, {m['devices']}, jax {m['jax']}",
      f"- FID features: `{summary['features']}` (classifier `{summary['classifier']}`, "
      f"test accuracy {'?' if acc is None else f'{acc:.1%}'}); real reference: "
      f"{summary['num_real_images']} held-out `{summary['real_split']}` images",
      f"- **noise level: FID(AR seed {args['seed']}, AR seed {noise_seed}) = "
      f"{summary['noise_fid']:.3f}**. A setting whose FID vs AR is at this level "
      '(ratio ~1) is statistically indistinguishable from AR at this number of images.',
      '- class acc: share of samples the classifier assigns to the requested class. NLL: '
      'bits/token of the samples under the AR model (teacher forcing, conditional, no CFG, '
      'temperature 1). Speed-ups are against the `ar` row.', '']
  lines += markdown_table(summary['rows'], COLUMNS)
  lines += ['', '![speed-up against FID](speedup_vs_fid.png)', '',
            'samples.png: the first images of each setting, one row per setting, in table '
            'order.', '']
  return '\n'.join(lines)


def plot(summary, path):
  """Speed-up against FID, one labelled point per setting, the noise level marked."""
  rows = summary['rows']
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  panels = ((axes[0], 'fid_ar', 'speedup_passes', 'FID vs AR samples',
             'speed-up in target passes', summary['noise_fid'], 'noise (AR vs AR)'),
            (axes[1], 'fid_real', 'speedup_wall', 'FID vs real test images',
             'speed-up in wall time', rows[0]['fid_real'], 'AR'))
  for ax, xkey, ykey, xlabel, ylabel, ref, ref_label in panels:
    for i, row in enumerate(rows):
      if row[xkey] is None:
        continue
      # One colour per setting in both panels; staggered labels so close points stay legible.
      ax.scatter(row[xkey], row[ykey], color=f'C{i % 10}',
                 marker='o' if row['lossless'] else 's')
      ax.annotate(row['label'], (row[xkey], row[ykey]), textcoords='offset points',
                  xytext=(4, 4 - 10 * (i % 3)), fontsize=8, color=f'C{i % 10}')
    ax.axvline(ref, color='grey', linestyle='--', linewidth=1, label=ref_label)
    ax.set_xlabel(xlabel + ' (lower is better)')
    ax.set_ylabel(ylabel)
    ax.legend(loc='best', fontsize=8)
    ax.grid(alpha=0.3)
  fig.suptitle(f"{summary['args']['num_images']} images per setting; circles lossless, "
               'squares lossy')
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
