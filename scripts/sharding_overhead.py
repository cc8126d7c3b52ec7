"""What placing decoding on a mesh costs at mesh = 1: replicated vs logically sharded.

  python scripts/sharding_overhead.py                        # random model of configs/ar.py's size
  python scripts/sharding_overhead.py --checkpoint=checkpoints/fmnist --methods=ar,ssd

"replicated" is how engine.build_decoder placed a method before issue 7 (parameters
replicated, no mesh or logical-axis context while tracing); "sharded" is build_decoder now
(parameters by the logical rules, activation constraints live). On one device both should
compile to the same program: the script compares the optimised instructions, checks the
tokens agree and prints the median run time of repeated batches, alternating the two so
machine load hits both alike.
"""

import argparse
import os
import re
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import ar as ar_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax import pretrained  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax import runtime  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.decoding import registry  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.decoding import engine  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.decoding import sampling as sampling_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.decoding import target as target_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.models import heads as heads_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from ssd_jax.models import transformer  # pylint: disable=g-import-not-at-top,wrong-import-position


def random_bundle():
  """configs/ar.py's model on a 14x14 grid of 512 codes, with random neighbour heads."""
  model = transformer.Transformer(vocab_size=512, num_classes=10, grid=(14, 14),
                                  **ar_config.get_config().model.to_dict())
  heads = heads_lib.NeighbourHeads(num_horizontal=3, num_vertical=2, dim=model.dim)
  k1, k2 = jax.random.split(jax.random.key(0))
  params = jax.jit(lambda k: sharding.strip_boxes(model.init(
      k, jnp.zeros((1, model.num_tokens), jnp.int32), jnp.zeros((1,), jnp.int32)))['params'])(k1)
  head_params = jax.jit(lambda k: sharding.strip_boxes(heads.init(
      k, jnp.zeros((1, model.dim)), jnp.zeros((1, model.dim))))['params'])(k2)
  return pretrained.Bundle('random', None, None, model, params,
                           stages={'heads': pretrained.Stage(heads, head_params)})


def build_replicated(bundle, method, sampling, mesh):
  """build_decoder as it was: everything replicated, traced outside any mesh context."""
  spec = registry.get(method)
  options = spec.make_options()

  def fn(params, labels, keys, values):
    target = target_lib.Target(bundle.model, sampling.processing(values))
    return spec.build(bundle, target, options)(params, labels, keys)

  batch = sharding.batch_sharding(mesh)
  rep = sharding.replicated(mesh)
  return jax.jit(fn, in_shardings=(rep, batch, batch, rep))


def compiled_ops(compiled):
  """The optimised program's instructions, without names, metadata or sharding notes (on
  one device those are annotations only), sorted."""
  ops = []
  for line in compiled.as_text().splitlines():
    line = line.strip()
    if ' = ' not in line or line.startswith('HloModule') or re.match(r'^\d+ ', line):
      continue
    line = re.sub(r', (sharding|metadata|frontend_attributes)=\{.*', '', line)
    ops.append(re.sub(r'%[\w.\-]+', '%', line))
  return sorted(ops)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--checkpoint', default=None, help='run folder (default: random model)')
  parser.add_argument('--methods', default='ar,ssd')
  parser.add_argument('--batch_size', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  runtime.setup()
  bundle = pretrained.load(args.checkpoint) if args.checkpoint else random_bundle()
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  sampling = sampling_lib.Sampling(temperature=1.0, cfg_scale=2.0)
  labels = engine.class_labels(args.batch_size, bundle.model.num_classes)
  keys = engine.image_keys(0, 0, args.batch_size)
  print(f'{jax.devices()[0].device_kind}, {os.cpu_count()} cores; batch {args.batch_size}, '
        f'{args.repeats} runs each, median seconds per batch')
  for method in args.methods.split(','):
    decoder = engine.build_decoder(bundle, method, sampling, mesh=mesh)
    inputs = decoder.inputs(labels, keys)
    paths = {'replicated': build_replicated(bundle, method, sampling, mesh),
             'sharded': decoder.jitted}
    compiled, compile_s, times, tokens = {}, {}, {k: [] for k in paths}, {}
    for name, fn in paths.items():
      t0 = time.perf_counter()
      compiled[name] = fn.lower(*inputs).compile()
      compile_s[name] = time.perf_counter() - t0
    for _ in range(args.repeats):
      for name in paths:
        t0 = time.perf_counter()
        out, _ = compiled[name](*inputs)
        tokens[name] = np.asarray(out)
        times[name].append(time.perf_counter() - t0)
    same = np.array_equal(tokens['replicated'], tokens['sharded'])
    same_ops = compiled_ops(compiled['replicated']) == compiled_ops(compiled['sharded'])
    print(f'{method}: ' + ', '.join(
        f'{name} {statistics.median(t):.3f} s (compile {compile_s[name]:.1f} s)'
        for name, t in times.items()) + f'; same tokens: {same}; same compiled ops: '
        f'{same_ops}')


if __name__ == '__main__':
  main()
