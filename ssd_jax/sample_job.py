"""sample.py's job: sample images with one method (optionally AR alongside) and report."""

import dataclasses
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np

from ssd_jax import images as image_io
from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib


@dataclasses.dataclass
class SampleArgs:
  method: str = 'ssd'
  num_images: int = 16
  batch_size: int = 16
  classes: Optional[Sequence[int]] = None
  cfg_scale: float = 2.0
  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  ssd_rounds: int = 1
  draft_len: int = 4
  sjd_window: int = engine.Options.sjd_window
  sjd_init: str = engine.Options.sjd_init
  gsd_rank_window: int = engine.Options.gsd_rank_window
  gsd_prob_threshold: float = engine.Options.gsd_prob_threshold
  gsd_dist_threshold: float = engine.Options.gsd_dist_threshold
  lantern_k: int = engine.Options.lantern_k
  lantern_delta: float = engine.Options.lantern_delta
  zipar_window: int = engine.Options.zipar_window
  hawk_draft_len: int = engine.Options.hawk_draft_len
  mulo_tau: float = engine.Options.mulo_tau
  mulo_k: int = engine.Options.mulo_k
  mulo_radius: int = engine.Options.mulo_radius
  mulo_lanes: int = engine.Options.mulo_lanes
  checkpoint: Optional[str] = None
  out: Optional[str] = 'samples.png'
  out_dir: Optional[str] = None
  tokens_out: Optional[str] = None
  report: Optional[str] = None
  compare_ar: bool = False
  mesh_data: int = -1
  mesh_model: int = 1
  progress: bool = True


def summary_line(report):
  line = (f"{report['method']}: {report['num_images']} images in {report['run_seconds']:.2f} s "
          f"({report['images_per_second']:.2f} img/s; compile {report['compile_seconds']:.1f} s), "
          f"{report['target_passes']} target passes ({report['tokens_per_pass']:.2f} tokens/pass)")
  if 'speedup_passes' in report:
    line += (f"; ar: {report['ar_target_passes']} passes in {report['ar_run_seconds']:.2f} s "
             f"-> {report['speedup_passes']:.2f}x fewer passes, {report['speedup_wall']:.2f}x "
             'wall')
  return line


def run(args: SampleArgs):
  sampling = sampling_lib.Sampling(temperature=args.temperature, top_k=args.top_k,
                                   top_p=args.top_p, cfg_scale=args.cfg_scale)
  method = engine.get_method(args.method)  # fail on a bad name before loading anything
  options = engine.Options(**{f.name: getattr(args, f.name)
                              for f in dataclasses.fields(engine.Options)
                              if hasattr(args, f.name)}).validate()
  bundle = pretrained.load(args.checkpoint, need_heads=method.needs_heads)
  mesh = sharding.make_mesh(args.mesh_data, args.mesh_model)
  common = dict(num_images=args.num_images, batch_size=args.batch_size, classes=args.classes,
                seed=args.seed, options=options, mesh=mesh, progress=args.progress)
  result = engine.generate(bundle, args.method, sampling, **common)
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
    os.makedirs(os.path.dirname(os.path.abspath(args.tokens_out)), exist_ok=True)
    np.save(args.tokens_out, result.tokens)
  if args.report:
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, 'w') as f:
      json.dump(report, f, indent=1, default=str)
