"""bench.py's speed mode: each method's target pass against its floor, per batch size.

For every batch size, dtype and setting (plain AR first: the baseline), in one process:
sequential target passes per batch, ms per pass (fastest run's seconds / target passes),
images/s, speed-ups against `ar` at the same batch size and dtype in passes and in wall
time, compile time apart (then one untimed warm-up batch), and the floor: a bare jitted
forward of the target (CFG included, outside any decoding loop, with the KV cache of the
decoding length, averaged over how much of it is committed) on 1 token and on the block
that the method's passes feed (`Method.block_tokens`). ms/pass over the k-token floor is
what the loop adds to the forward (drafting, acceptance, bookkeeping); the k-token floor
over the 1-token floor is what verifying a block costs on this machine.
"""

import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
from tqdm import tqdm

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import engine
from ssd_jax.decoding import registry
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.eval import report
from ssd_jax.eval import speed_report
from ssd_jax.models import transformer

@dataclasses.dataclass
class Setting:
  label: str
  method: registry.Method
  options: object


def settings_of(config):
  """Plain AR, then config.settings, each method's options validated."""
  settings = [Setting('ar', registry.get('ar'), registry.NoOptions())]
  for label, method, options in engine.resolve_settings(config.settings):
    if label not in [s.label for s in settings]:
      settings.append(Setting(label, method, options))
  return settings


def check_config(config):
  """Bad batch sizes, repeats or dtypes stop here, before anything loads."""
  if not config.batches:
    raise ValueError('--config.batches is empty; give (batch size, images) pairs.')
  for entry in config.batches:
    if len(entry) != 2 or not 1 <= entry[0] <= entry[1]:
      raise ValueError(f'--config.batches entry {tuple(entry)!r} is not (batch size, images) '
                       'with 1 <= batch size <= images.')
  if config.repeats < 1:
    raise ValueError(f'--config.repeats={config.repeats} must be >= 1.')
  if not (config.repeat_seconds >= 0 and config.floor_seconds > 0):
    raise ValueError(f'--config.repeat_seconds={config.repeat_seconds} must be >= 0 and '
                     f'--config.floor_seconds={config.floor_seconds} > 0.')
  for dtype in config.dtypes:
    if dtype not in engine.DTYPES:
      raise ValueError(f'--config.dtypes has {dtype!r}; choose from '
                       f'{", ".join(engine.DTYPES)}.')


def forward_floor(bundle, sampling, dtype, device, batch, tokens, seconds, repeats, budget):
  """Milliseconds of one bare target forward of `tokens` tokens per sample at `batch`, with
  parameters, activations and cache in `dtype` as the engine runs them, averaged over the
  decoding: attention reads the cache only up to the bucket that holds the committed
  length (models/transformer.py), so the forward is timed at one committed length per
  bucket, the middle of the stretch of the grid that reads it (1/8, 3/8, 5/8, 7/8 of the
  grid with 4 buckets), and the times are averaged.

  The forwards run in a jitted loop that does nothing else (no Python dispatch per
  forward, as in a decoding loop), as many as take seconds / points; at each point the
  fastest of such loops (see `repeated`), per forward.
  """
  target = target_lib.Target(bundle.model, sampling.processing(), jnp.dtype(dtype))
  n = bundle.model.num_tokens
  max_len = target.prefix_len + n + tokens
  points = len(transformer.kv_bucket_sizes(max_len, bundle.model.kv_buckets))
  params = jax.device_put(engine.cast(bundle.params, jnp.dtype(dtype)), device)
  block = jnp.zeros((batch, tokens), jnp.int32)

  def forwards(params, cache, slots, count):
    # The probabilities are carried, so no forward's work is dead code.
    forward = lambda cache: target.forward(params, block, slots, cache)[::2]
    probs = jax.eval_shape(forward, cache)[0]
    return jax.lax.fori_loop(0, count, lambda _, carry: forward(carry[1]),
                             (jnp.zeros(probs.shape, probs.dtype), cache))

  step = jax.jit(forwards, donate_argnums=1)  # the cache is updated in place, as in decoding
  # One compile for every committed length (it enters as data).
  make_cache = jax.jit(lambda committed: target.commit(
      target.init_cache(batch, extra_slots=tokens), jnp.full((batch,), committed)))
  times = []
  for i in range(points):
    committed = target.prefix_len + (2 * i + 1) * n // (2 * points)
    cache = jax.device_put(make_cache(committed), device)
    slots = committed + jnp.broadcast_to(jnp.arange(tokens), (batch, tokens))
    carry = jax.block_until_ready(step(params, cache, slots, 1))  # compiles once

    def timed(count):
      nonlocal carry
      t0 = time.perf_counter()
      carry = jax.block_until_ready(step(params, carry[1], slots, count))
      return (time.perf_counter() - t0) / count

    count = max(1, math.ceil(seconds / points / timed(1)))
    times.append(min(repeated(lambda: timed(count), repeats, budget / points)))
  return 1000 * sum(times) / points


def repeated(timed, repeats, budget):
  """[seconds] of up to `repeats` calls of timed(), fewer once they add up to `budget`.

  Callers keep the fastest: other work on the machine only ever adds time, so the minimum
  is the estimate that moves least between runs (a median of 3 moved the same floor by
  1.6x between two runs on a shared 2-core CPU).
  """
  seconds = [timed()]
  while len(seconds) < repeats and sum(seconds) < budget:
    seconds.append(timed())
  return seconds


def busy_cpus(seconds=1.0):
  """CPUs kept busy by other work just before the timing starts: the busy share of all
  CPUs over `seconds` (Linux /proc/stat) times their count; None where it cannot be read.
  (Not the 1-minute load average: that still counts a run that ended a minute ago.)"""
  def sample():
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
    return fields[3] + fields[4], sum(fields)  # idle + iowait, total
  try:
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
  except (OSError, ValueError, IndexError):
    return None
  total = max(total1 - total0, 1)
  return (1.0 - (idle1 - idle0) / total) * (os.cpu_count() or 1)


def time_setting(bundle, setting, sampling, dtype, mesh, batch, num_images, config):
  """One row: compile, one warm-up batch, then the fastest of the timed runs."""
  def run(count):
    return engine.generate(bundle, setting.method.name, sampling, count, batch,
                           list(config.classes) or None, config.seed, setting.options, mesh,
                           progress=False, dtype=dtype).stats
  warm = run(batch)
  runs = []

  def timed():
    runs.append(run(num_images))
    return runs[-1]['run_seconds']

  repeated(timed, config.repeats, config.repeat_seconds)
  seconds = min(r['run_seconds'] for r in runs)
  stats = runs[0]
  return dict(
      label=setting.label, method=setting.method.name, lossless=setting.method.lossless,
      options=stats['options'], batch_size=batch, num_images=num_images,
      block_tokens=setting.method.block_tokens(setting.options, bundle.model.grid),
      target_passes=stats['target_passes'],
      passes_per_batch=stats['target_passes_per_batch'],
      tokens_per_pass=stats['tokens_per_pass'], compile_seconds=warm['compile_seconds'],
      run_seconds=seconds, run_seconds_each=[r['run_seconds'] for r in runs],
      ms_per_pass=1000 * seconds / stats['target_passes'],
      images_per_second=num_images / max(seconds, 1e-9))


def run(config, out_dir, command=''):
  """Times config.settings against plain AR; writes results.md and results.json."""
  check_config(config)
  settings = settings_of(config)
  sampling = sampling_lib.Sampling(**config.sampling.to_dict()).validate(float('inf'))
  bundle = pretrained.load(config.checkpoint or None,
                           stages=[stage for s in settings for stage in s.method.needs])
  for s in settings:
    engine.check_stages(bundle, s.method)
    s.method.validate(s.options, bundle)
  sampling.validate(bundle.model.vocab_size)
  data, model = config.mesh.data, config.mesh.model
  # The first data x model devices (one by default, as latency is quoted); -1: all.
  mesh = sharding.make_mesh(data, model, devices=jax.devices()[:data * model]
                            if data > 0 and model > 0 else None)
  device = mesh.devices.flat[0]
  log = jax.process_index() == 0  # every process runs every setting; one reports
  jobs = [(batch, images, dtype, s) for batch, images in config.batches
          for dtype in config.dtypes for s in settings]
  rows, floors, skipped = [], {}, []
  busy_before = busy_cpus()
  t0 = time.perf_counter()
  for batch, images, dtype, s in tqdm(jobs, desc='speed', unit='setting',
                                      disable=not config.progress or not log):
    if config.time_limit and time.perf_counter() - t0 > config.time_limit:
      skipped.append(dict(dtype=dtype, batch_size=batch, label=s.label,
                          reason=f'time limit of {config.time_limit:g} s'))
      continue
    row = dict(dtype=dtype, **time_setting(bundle, s, sampling, dtype, mesh, batch, images,
                                           config))
    for k in (1, row['block_tokens']):
      if (dtype, batch, k) not in floors:
        floors[dtype, batch, k] = forward_floor(bundle, sampling, dtype, device, batch, k,
                                                config.floor_seconds, config.repeats,
                                                config.repeat_seconds)
    row['floor_1_ms'] = floors[dtype, batch, 1]
    row['floor_k_ms'] = floors[dtype, batch, row['block_tokens']]
    row['pass_over_floor_k'] = row['ms_per_pass'] / row['floor_k_ms']
    rows.append(row)
    if log:
      tqdm.write(speed_report.row_line(row))
  for row in rows:
    ar = [r for r in rows if r['method'] == 'ar' and r['dtype'] == row['dtype']
          and r['batch_size'] == row['batch_size']]
    row['speedup_passes'] = ar[0]['target_passes'] / row['target_passes'] if ar else None
    row['speedup_wall'] = ar[0]['run_seconds'] / row['run_seconds'] if ar else None
  summary = dict(
      command=command, args=config.to_dict(), checkpoint=report.relative(bundle.run_dir),
      grid=list(bundle.model.grid), sampling=dataclasses.asdict(sampling),
      machine=report.machine(), floor_device=str(device), dtypes=list(config.dtypes),
      busy_before=busy_before, cpus=os.cpu_count(),
      skipped=skipped, seconds=time.perf_counter() - t0, rows=rows)
  if log:
    speed_report.write_all(out_dir, summary)
  return summary


def summary_line(summary, out_dir):
  """One line for the console: the best wall-clock speed-up at each batch size."""
  best = []
  for batch in dict.fromkeys(r['batch_size'] for r in summary['rows']):
    rows = [r for r in summary['rows'] if r['batch_size'] == batch and r['method'] != 'ar'
            and r['speedup_wall']]
    if rows:
      top = max(rows, key=lambda r: r['speedup_wall'])
      best.append(f"batch {batch}: {top['label']} {top['speedup_wall']:.2f}x ({top['dtype']})")
  lead = f"best wall-clock speed-up over ar: {'; '.join(best)}; " if best else ''
  return f'{lead}wrote {out_dir}/results.md, results.json'
