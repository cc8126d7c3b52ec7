"""Per-head acceptance of neighbour heads, on held-out data grids or on the backbone's own samples.

  python scripts/heads_acceptance.py --heads=checkpoints/fmnist/heads --on=samples
  python scripts/heads_acceptance.py --heads=/path/run/heads --on=data --num=2000

Prints, per head, sum(min(p, q)) at temperature 1 without guidance and with CFG (both p and
q guided, as the engine verifies), on `--num` grids: the first held-out test images
(`--on=data`) or plain AR samples of the release's backbone drawn at `--seed` (`--on=samples`,
the distribution the heads draft for when decoding; cached in `--samples_dir`). The default
seed 5000 is none that training (7777) or the benchmarks (0, 1, 1000, 1001) use.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssd_jax import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.data import pipeline  # pylint: disable=wrong-import-position
from ssd_jax.training import ar_stage  # pylint: disable=wrong-import-position
from ssd_jax.training import heads_stage  # pylint: disable=wrong-import-position
from ssd_jax.training import self_samples  # pylint: disable=wrong-import-position


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--heads', default='checkpoints/fmnist/heads', help='heads stage folder')
  parser.add_argument('--release', default='checkpoints/fmnist',
                      help='release (or run) folder with the tokenizer and ar stages')
  parser.add_argument('--on', choices=('data', 'samples'), default='samples')
  parser.add_argument('--num', type=int, default=1000, help='grids to measure on')
  parser.add_argument('--cfg_scale', type=float, default=2.0)
  parser.add_argument('--seed', type=int, default=5000, help='seed of the samples')
  parser.add_argument('--samples_dir', default='',
                      help="cache of the samples; '' = /tmp/ssd_jax_samples_<seed>_cfg<scale>")
  args = parser.parse_args()
  if args.num < 1 or args.cfg_scale < 1:
    parser.error(f'--num={args.num} must be >= 1 and --cfg_scale={args.cfg_scale} >= 1.')

  model, backbone, ar_spec = pretrained.load_stage(os.path.join(args.release, 'ar'), 'ar')
  heads, head_params, _ = pretrained.load_stage(args.heads, 'heads')
  if args.on == 'samples':
    directory = args.samples_dir or f'/tmp/ssd_jax_samples_{args.seed}_cfg{args.cfg_scale:g}'
    data = self_samples.source(model, backbone, ar_spec['transformer'], args.num,
                               args.cfg_scale, args.seed, directory).arrays()
    grids = lambda batch: batch['tokens'].reshape(batch['tokens'].shape[0], -1)
  else:
    tokenizer, tok_params, _ = pretrained.load_stage(os.path.join(args.release, 'tokenizer'),
                                                     'tokenizer')
    from configs import heads as heads_config  # pylint: disable=g-import-not-at-top
    config = heads_config.get_config()
    data = pipeline.load_arrays(config.data, config.data.eval_split, args.num)
    encode = ar_stage.encode_fn(tokenizer)
    grids = lambda batch: encode(tok_params, batch['image'])
  results = heads_stage.evaluate_heads(model, heads, backbone, head_params, grids, data,
                                       cfg_scale=args.cfg_scale)
  print(f'{args.heads} on {len(data["label"])} {args.on} grids')
  print(f'{"head":<14}{"acceptance":>12}{f"CFG {args.cfg_scale:g}":>12}{"top-1":>10}')
  for name, r in results.items():
    print(f'{name:<14}{r["acceptance"]:>12.3f}{r.get("acceptance_cfg", float("nan")):>12.3f}'
          f'{r["top1_agreement"]:>10.3f}')


if __name__ == '__main__':
  main()
