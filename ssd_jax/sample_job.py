"""sample.py's job: sample images with one method (optionally AR alongside) and report.

Everything a user can get wrong is checked before the checkpoint loads: the method and its
options, the sampling settings, the output paths (writable), the mesh.
"""

import dataclasses
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from ssd_jax import cli
from ssd_jax import images as image_io
from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib

arg = cli.arg


@dataclasses.dataclass
class SampleArgs:
  """sample.py's arguments (the method's own knobs come as --<method>_<field>)."""
  method: str = arg('ssd', 'Decoding method (registry.names()).')
  num_images: int = arg(16, 'Images to sample.')
  batch_size: int = arg(16, 'Images per decoding batch.')
  classes: Optional[Sequence[int]] = arg(None, 'Comma list of class ids, cycled (default: '
                                         'all classes cycled).')
  cfg_scale: float = arg(2.0, 'Classifier-free guidance (1 = off).')
  temperature: float = arg(1.0, 'Sampling temperature (0 = greedy).')
  top_k: int = arg(0, 'Top-k filter (0 = off).')
  top_p: float = arg(1.0, 'Top-p (nucleus) filter (1 = off).')
  seed: int = arg(0, 'Image i uses key fold_in(key(seed), i).')
  checkpoint: Optional[str] = arg(None, 'Run folder (default: checkpoints/fmnist).')
  out: Optional[str] = arg('samples.png', 'PNG grid of all images ("" = none).')
  out_dir: Optional[str] = arg(None, 'Folder for one PNG per image.')
  tokens_out: Optional[str] = arg(None, '.npy of the token grids [N, H, W].')
  report: Optional[str] = arg(None, 'JSON report path.')
  compare_ar: bool = arg(False, 'Also run plain AR on the same classes and seeds and report '
                         'the speed-up.')
  dtype: str = arg('float32', 'Parameters, activations and KV cache (bfloat16 for GPUs / '
                   'TPUs; probabilities stay float32).', choices=('float32', 'bfloat16'))
  mesh_data: int = arg(-1, 'Devices on the data axis (-1: all).')
  mesh_model: int = arg(1, 'Devices on the model axis.')
  progress: bool = arg(True, 'Show progress bars.')
  options: Optional[dict] = None  # the method's knobs {field: value}; None = its defaults


def summary_line(report):
  line = (f"{report['method']}: {report['num_images']} images in {report['run_seconds']:.2f} s "
          f"({report['images_per_second']:.2f} img/s; compile {report['compile_seconds']:.1f} s), "
          f"{report['target_passes']} target passes ({report['tokens_per_pass']:.2f} tokens/pass)")
  if 'speedup_passes' in report:
    line += (f"; ar: {report['ar_target_passes']} passes in {report['ar_run_seconds']:.2f} s "
             f"-> {report['speedup_passes']:.2f}x fewer passes, {report['speedup_wall']:.2f}x "
             'wall')
  return line


def check(args: SampleArgs):
  """(method, options, sampling) for `args`, refusing anything bad before work starts."""
  method = registry.get(args.method)
  options = engine.resolve_options(method, args.options)  # bundle-free checks first
  sampling = sampling_lib.Sampling(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, cfg_scale=args.cfg_scale)
  sampling.validate(vocab_size=float('inf'))  # the vocabulary bound is checked on load
  if args.num_images < 1:
    raise ValueError(f'--num_images={args.num_images} must be >= 1.')
  if args.batch_size < 1:
    raise ValueError(f'--batch_size={args.batch_size} must be >= 1.')
  mesh = sharding.make_mesh(args.mesh_data, args.mesh_model)
  sharding.check_divisible(args.batch_size, mesh)
  cli.check_writable(args.out, 'out')
  cli.check_writable(args.out_dir, 'out_dir', folder=True)
  cli.check_writable(args.tokens_out, 'tokens_out')
  cli.check_writable(args.report, 'report')
  return method, options, sampling, mesh


def run(args: SampleArgs):
  method, options, sampling, mesh = check(args)
  bundle = pretrained.load(args.checkpoint, stages=method.needs)
  if (args.out or args.out_dir) and bundle.tokenizer is None:
    raise ValueError(f'{bundle.run_dir} has no tokenizer/ stage, so no images can be made; '
                     "pass --out='' and --tokens_out=FILE.npy to keep the token grids.")
  common = dict(num_images=args.num_images, batch_size=args.batch_size, classes=args.classes,
                seed=args.seed, mesh=mesh, progress=args.progress, dtype=args.dtype)
  result = engine.generate(bundle, args.method, sampling, options=options, **common)
  report = dict(result.stats, checkpoint=bundle.run_dir)
  if args.compare_ar:
    base = engine.generate(bundle, 'ar', sampling, **common)
    report.update(
        ar_target_passes=base.stats['target_passes'], ar_run_seconds=base.stats['run_seconds'],
        ar_compile_seconds=base.stats['compile_seconds'],
        speedup_passes=base.stats['target_passes'] / result.stats['target_passes'],
        speedup_wall=base.stats['run_seconds'] / max(result.stats['run_seconds'], 1e-9),
        token_agreement_with_ar=float(np.mean(base.tokens == result.tokens)))
  _write_outputs(args, bundle, result, report)
  return report


def _write_outputs(args, bundle, result, report):
  if jax.process_index() != 0:  # every process holds the same result
    return
  images = None
  if args.out or args.out_dir:
    images = bundle.decode_images(result.tokens)
  if args.out:
    image_io.save_grid(args.out, images, ncols=min(len(images), 10))
    report['out'] = args.out
  if args.out_dir:
    names = bundle.class_names or ()
    for i, (image, label) in enumerate(zip(images, result.labels)):
      name = names[label] if label < len(names) else f'class{label}'
      image_io.save_png(os.path.join(args.out_dir, f'{i:05d}_{name}.png'), image, scale=1)
  if args.tokens_out:
    np.save(args.tokens_out, result.tokens)
  if args.report:
    with open(args.report, 'w') as f:
      json.dump(report, f, indent=1, default=str)
