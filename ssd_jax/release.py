"""Exports trained stages of a run folder as a release: parameters only, plus the files
that describe them (model.json, config.json, results.json, PNGs, metrics.jsonl).

  python -m ssd_jax.release --run=runs/fmnist --out=checkpoints/fmnist

The optimizer state is left out (it would triple the size); `train.py` pointed at a
release restarts the optimizer from the released parameters.
"""

import argparse
import os
import shutil

from ssd_jax.training import checkpoint

KEEP_FILES = ('model.json', 'config.json', 'results.json', 'metrics.jsonl')


def export_stage(stage_dir, out_dir):
  ckpts = checkpoint.StageCheckpoints(stage_dir)
  step = ckpts.latest_step()
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpts.directory}')
  if os.path.exists(out_dir):
    shutil.rmtree(out_dir)
  src = os.path.join(ckpts.directory, str(step))
  dst = os.path.join(out_dir, 'checkpoints', str(step))
  shutil.copytree(src, dst, ignore=lambda d, names: ['train'] if d == src else [])
  for name in os.listdir(stage_dir):
    if name in KEEP_FILES or name.endswith('.png'):
      shutil.copy2(os.path.join(stage_dir, name), out_dir)
  return step


def dir_size(path):
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--run', required=True, help='run folder with one subfolder per stage')
  parser.add_argument('--out', required=True, help='release folder to (re)write')
  parser.add_argument('--stages', default='', help='comma list (default: all present)')
  args = parser.parse_args()
  stages = args.stages.split(',') if args.stages else sorted(
      d for d in os.listdir(args.run) if os.path.exists(os.path.join(args.run, d, 'model.json')))
  for stage in stages:
    step = export_stage(os.path.join(args.run, stage), os.path.join(args.out, stage))
    print(f'{stage}: step {step} -> {os.path.join(args.out, stage)} '
          f'({dir_size(os.path.join(args.out, stage)) / 1e6:.1f} MB)')
  print(f'release {args.out}: {dir_size(args.out) / 1e6:.1f} MB in all')


if __name__ == '__main__':
  main()
