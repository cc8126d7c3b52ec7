"""bench.py's speed-mode outputs: results.json and results.md (latency and throughput tables)."""

import json
import os

from ssd_jax.eval import report

COLUMNS = (  # (header, row key, format)
    ('setting', 'label', '{}'), ('lossless', 'lossless', '{}'),
    ('block k', 'block_tokens', '{:d}'), ('passes/batch', 'passes_per_batch', '{:.1f}'),
    ('ms/pass', 'ms_per_pass', '{:.3f}'), ('floor 1 tok ms', 'floor_1_ms', '{:.3f}'),
    ('floor k tok ms', 'floor_k_ms', '{:.3f}'),
    ('pass / floor k', 'pass_over_floor_k', '{:.2f}x'),
    ('speed-up (passes)', 'speedup_passes', '{:.2f}x'),
    ('speed-up (wall)', 'speedup_wall', '{:.2f}x'), ('img/s', 'images_per_second', '{:.2f}'),
    ('compile s', 'compile_seconds', '{:.1f}'),
)


def row_line(row):
  return (f"{row['dtype']} batch {row['batch_size']} {row['label']}: "
          f"{row['passes_per_batch']:.1f} passes/batch, {row['ms_per_pass']:.3f} ms/pass "
          f"(floor {row['floor_1_ms']:.3f} ms for 1 token, {row['floor_k_ms']:.3f} ms for "
          f"{row['block_tokens']}), {row['images_per_second']:.2f} img/s")


def _table(rows, with_batch):
  columns = ((('batch', 'batch_size', '{:d}'),) if with_batch else ()) + COLUMNS
  return report.markdown_table(rows, columns)


def markdown(summary):
  args, m, rows = summary['args'], summary['machine'], summary['rows']
  images = ', '.join(f'{n} at batch {b}' for b, n in args['batches'])
  lines = [
      '# Decoding speed: each method\'s target pass against its floor', '',
      f"Command: `{summary['command'] or '(library call)'}`", '',
      f"- checkpoint: `{summary['checkpoint']}` ({summary['grid'][0]}x{summary['grid'][1]} "
      f"tokens); classes {args['classes'] or 'all, cycled'}; seed {args['seed']} for every "
      f'setting; images per timed run: {images}',
      f"- sampling: {summary['sampling']}",
      f"- machine: {m['processor']}, {m['platform']}, {m['devices']}, jax {m['jax']}; mesh "
      f"data={args['mesh']['data']} model={args['mesh']['model']}",
      f"- timing: compile time apart, then one untimed warm-up batch, then the fastest of "
      f"{args['repeats']} timed runs (fewer once they add up to {args['repeat_seconds']:g} "
      "s; each row's are in results.json; other work on the machine only adds time). "
      'ms/pass = run seconds / sequential target passes (per batch, the slowest sample\'s '
      'count). Speed-ups are against `ar` at the same batch size and dtype, in this run.',
      f"- floor: a bare jitted forward of the target (CFG doubles the rows; outside any "
      f"decoding loop; the KV cache of the decoding length, averaged over one committed "
      f"length per attention bucket, the middle of each stretch of the grid that reads it) "
      f"on 1 token and on the block k that one pass of the method feeds, per forward of "
      f"jitted loops of {args['floor_seconds']:g} s in all that do nothing else, timed like "
      f"the runs, on "
      f"{summary['floor_device']}. pass / floor k = ms/pass "
      'over the k-token floor: 1.00x means the loop adds nothing to the forward.']
  busy = summary.get('busy_before')
  if busy is not None:
    lines.append(f"- CPUs busy with other work just before timing: {busy:.2f} of "
                 f"{summary['cpus']}" + ('; **times are inflated and less comparable between '
                 'runs**' if busy >= 0.25 else ''))
  for s in summary['skipped']:
    lines.append(f"- not measured: batch {s['batch_size']} {s['label']} ({s['dtype']}): "
                 f"{s['reason']}")
  for dtype in summary['dtypes']:
    latency = [r for r in rows if r['dtype'] == dtype and r['batch_size'] == 1]
    throughput = [r for r in rows if r['dtype'] == dtype and r['batch_size'] > 1]
    if latency:
      lines += ['', f'## Latency (batch 1), {dtype}', ''] + _table(latency, False)
    if throughput:
      sizes = ', '.join(str(b) for b in dict.fromkeys(r['batch_size'] for r in throughput))
      lines += ['', f'## Throughput (batch {sizes}), {dtype}', ''] + _table(throughput, True)
  return '\n'.join(lines + [''])


def write_all(out_dir, summary):
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'results.json'), 'w') as f:
    json.dump(summary, f, indent=1, default=str)
  with open(os.path.join(out_dir, 'results.md'), 'w') as f:
    f.write(markdown(summary))
