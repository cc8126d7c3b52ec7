"""The training loop every stage shares: sharded jit step, checkpoints, resume, progress.

A stage supplies pure functions (parameter init, loss, optional post-update) and an
evaluation; this file owns everything else, so all stages get the same resume, logging and
non-finite guard. The batch at step s and the PRNG key at step s depend only on
(seed, s), so a resumed run takes the same path as an uninterrupted one.
"""

import contextlib
import dataclasses
import json
import math
import os
import signal
import time
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import optax

from ssd_jax import sharding
from ssd_jax.data import pipeline
from ssd_jax.training import checkpoint


@flax.struct.dataclass
class TrainState:
  step: jax.Array       # [] int32, optimizer steps taken
  params: Any           # the trained parameters (a plain pytree)
  opt_state: Any        # optax state, same sharding as params
  extra: Any            # stage state that is not optimised (e.g. codebook usage)


@dataclasses.dataclass
class Stage:
  """What a training stage plugs into the loop."""
  name: str
  # key -> params, leaves may be nn.LogicallyPartitioned (they set the sharding).
  init_params: Callable
  # (params, frozen, batch, key, extra) -> (loss, (metrics dict, aux)).
  loss_fn: Callable
  # (params, frozen, stage_dir, mesh) -> dict of final metrics; writes its own files.
  evaluate: Callable
  # Parameters of earlier stages, used but not trained (the loop replicates them).
  frozen: Any = None
  # params -> initial extra state.
  init_extra: Callable = lambda params: {}
  # (state, aux, key) -> state, run inside the jitted step after the update.
  post_update: Optional[Callable] = None
  # What rebuilds the trained module (saved as model.json; see ssd_jax/pretrained.py).
  spec: Optional[dict] = None
  # Attention heads of the trained module, if it has any: the mesh must divide them.
  num_heads: Optional[int] = None
  # () -> the training split's source (e.g. a token cache, tokenized on first use);
  # None = the tfds split config.data.train_split.
  train_source: Optional[Callable] = None


def make_optimizer(config):
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate,
      warmup_steps=min(config.warmup_steps, max(config.num_steps - 1, 1)),
      decay_steps=max(config.num_steps, 2), end_value=config.learning_rate * 0.1)
  return optax.chain(
      optax.clip_by_global_norm(config.grad_clip),
      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=config.weight_decay))


def _format_eta(seconds):
  if not math.isfinite(seconds):
    return '?'
  h, rem = divmod(int(seconds), 3600)
  return f'{h}h{rem // 60:02d}m' if h else f'{rem // 60}m{rem % 60:02d}s'


def log(msg):
  if jax.process_index() == 0:
    print(msg, flush=True)


class _Preemption:
  """Turns SIGTERM into a clean stop (checkpoint, then exit) instead of lost work.

  One process: a Python handler sets a flag, read after every step. Several processes:
  the checkpoint is one collective save, so all of them must stop at the same step, while
  SIGTERM may reach only some. JAX's preemption service (started by
  jax.distributed.initialize) catches SIGTERM on any process and agrees on the step after
  the furthest one any process has reached; `stop_after(step)` is true there on every
  process. A Python handler would replace the service's, so none is installed then.
  """

  def __enter__(self):
    self._requested = False
    self._use_service = jax.distributed.is_initialized()
    self._installed = not self._use_service
    if self._installed:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self._requested = True

  def stop_after(self, step):
    """Whether to save and stop after `step`; call it after every step, in order."""
    if self._use_service:
      try:
        return multihost_utils.reached_preemption_sync_point(step)
      except RuntimeError:  # jax_enable_preemption_service is off: SIGTERM just ends us.
        self._use_service = False
    return self._requested

  def __exit__(self, *exc):
    if self._installed:
      signal.signal(signal.SIGTERM, self._old)


def build_train_step(stage, tx):
  def train_step(state, frozen, batch, key):
    grad_fn = jax.value_and_grad(stage.loss_fn, has_aux=True)
    (loss, (metrics, aux)), grads = grad_fn(state.params, frozen, batch, key, state.extra)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    if stage.post_update is not None:
      new_state = stage.post_update(new_state, aux, key)
    metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads))
    return new_state, metrics
  return train_step


def init_state_fn(stage, tx):
  def init(key):
    params = stage.init_params(key)  # boxed: the boxes carry the logical axes
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), extra=stage.init_extra(sharding.strip_boxes(params)))
  return init


@contextlib.contextmanager
def _committing(ckpts):
  """Waits for the save in flight also when a step raises (non-finite loss, Ctrl-C): else
  the last good checkpoint stays a temporary folder, which a rerun ignores."""
  try:
    yield
  finally:
    ckpts.wait()


def _check_finite(metrics, step, last_saved):
  for name, value in metrics.items():
    if not math.isfinite(value):
      raise FloatingPointError(
          f'training stopped: metric {name!r} is {value} at step {step}. The last good '
          f'checkpoint (step {last_saved}) is kept; lower --config.learning_rate or '
          '--config.grad_clip and rerun with the same --workdir to resume from it.')


def train(config, workdir, stage):
  """Trains `stage` into `<workdir>/<stage.name>`; resumes from the newest checkpoint."""
  stage_dir = os.path.join(workdir, stage.name)
  mesh = sharding.mesh_from_config(config)
  rules = sharding.rules_from_config(config)
  sharding.check_divisible(config.batch_size, mesh)
  if stage.num_heads is not None:
    sharding.check_heads_divisible(stage.num_heads, mesh, rules, '--config.mesh.model',
                                   what=f'the {stage.name} model')
  # Opened before anything compiles: a missing dataset is a message, not lost minutes.
  source = (stage.train_source() if stage.train_source is not None
            else pipeline.data_source(config.data, config.data.train_split))
  tx = make_optimizer(config)
  ckpts = checkpoint.StageCheckpoints(stage_dir, keep=config.keep_checkpoints)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    init = init_state_fn(stage, tx)
    abstract_boxed = jax.eval_shape(init, jax.random.key(0))
    sharding.check_params_divisible(
        abstract_boxed.params, mesh, rules,
        fix='Choose --config.mesh.model dividing it, or map that axis to None in '
            '--config.mesh.rules.')
    state_shardings = sharding.logical_shardings(abstract_boxed, mesh, rules)
    abstract = sharding.strip_boxes(abstract_boxed)
    state = _restore_or_init(config, ckpts, init, abstract, state_shardings)
    checkpoint.save_json(os.path.join(stage_dir, 'config.json'), config.to_dict())
    if stage.spec is not None:
      checkpoint.save_json(os.path.join(stage_dir, 'model.json'), stage.spec)
    start = int(state.step)
    # Earlier stages load onto one device (pretrained.load_stage); jit on this mesh needs
    # them on its devices.
    frozen = sharding.put(stage.frozen, sharding.replicated(mesh))

    step_fn = jax.jit(build_train_step(stage, tx),
                      in_shardings=(state_shardings, None, None, None),
                      out_shardings=(state_shardings, None), donate_argnums=0)
    base_key = jax.random.key(config.seed)
    last_saved = start
    if start < config.num_steps:
      log(f'[{stage.name}] training steps {start}..{config.num_steps} in {stage_dir} '
          f'on a data={mesh.shape["data"]} x model={mesh.shape["model"]} mesh')
      batches = pipeline.Batches(source, config.batch_size, config.seed, start_step=start)
      metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
      t0, steps_done, pending = time.time(), 0, []
      with _Preemption() as preemption, _committing(ckpts):
        for step in range(start, config.num_steps):
          batch = sharding.global_batch(next(batches), mesh)
          state, metrics = step_fn(state, frozen, batch,
                                   jax.random.fold_in(base_key, step))
          pending.append(metrics)
          steps_done += 1
          done = step + 1
          stop = preemption.stop_after(done)
          if done % config.log_every == 0 or done == config.num_steps or stop:
            host = {k: float(jnp.mean(jnp.stack([m[k] for m in pending])))
                    for k in pending[0]}
            pending = []
            _check_finite(host, done, last_saved)
            rate = steps_done / max(time.time() - t0, 1e-9)
            eta = (config.num_steps - done) / rate if rate > 0 else float('inf')
            shown = ' '.join(f'{k} {v:.4g}' for k, v in sorted(host.items()))
            log(f'[{stage.name}] step {done}/{config.num_steps} {shown} '
                f'{rate:.2f} steps/s ETA {_format_eta(eta)}')
            if jax.process_index() == 0:
              with open(metrics_path, 'a') as f:
                f.write(json.dumps(dict(host, step=done, steps_per_s=rate)) + '\n')
          if done % config.checkpoint_every == 0 or done == config.num_steps or stop:
            ckpts.save(done, state.params, _train_item(state), force=True)
            last_saved = done
          if stop:
            ckpts.wait()
            log(f'[{stage.name}] stopped by SIGTERM at step {done} (saved); rerun the same '
                'command to resume.')
            raise SystemExit(143)
    log(f'[{stage.name}] evaluating ...')
    results = _evaluate(stage, state.params, frozen, stage_dir, mesh)
    results['step'] = int(state.step)
    checkpoint.save_json(os.path.join(stage_dir, 'results.json'), results)
    log(f'[{stage.name}] results: ' + json.dumps(results, default=str))
    return state, results


def _evaluate(stage, params, frozen, stage_dir, mesh):
  """stage.evaluate. Evaluations jit over closed-over parameters and read results with
  np.asarray, which arrays spanning other processes do not allow: with several processes
  each one evaluates alone, on a full local copy and its own first device (only process 0
  writes what they find)."""
  if jax.process_count() == 1:
    return stage.evaluate(params, frozen, stage_dir, mesh)
  params = multihost_utils.process_allgather(params, tiled=True)
  local = sharding.make_mesh(1, 1, devices=jax.local_devices()[:1])
  with jax.set_mesh(local):
    return stage.evaluate(params, stage.frozen, stage_dir, local)


def _train_item(state):
  return {'step': state.step, 'opt_state': state.opt_state, 'extra': state.extra}


def _restore_or_init(config, ckpts, init, abstract, shardings_):
  """Restore order: this stage's own newest checkpoint, else a fresh init."""
  step = ckpts.latest_step()
  if step is None:
    log(f'no checkpoint in {ckpts.directory}; starting from scratch (seed {config.seed})')
    return sharding.strip_boxes(jax.jit(init, out_shardings=shardings_)(
        jax.random.key(config.seed)))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings_)
  if ckpts.has_item(step, 'train'):
    items = ckpts.restore(step, {'params': target.params, 'train': _train_item(target)})
    train_item = items['train']
    log(f'resumed from {ckpts.directory} at step {step}')
    return TrainState(step=train_item['step'], params=items['params'],
                      opt_state=train_item['opt_state'], extra=train_item['extra'])
  # A released checkpoint: parameters only; the optimizer starts again at that step.
  params = ckpts.restore(step, {'params': target.params})['params']
  fresh = sharding.strip_boxes(jax.jit(init, out_shardings=shardings_)(jax.random.key(config.seed)))
  log(f'restored parameters of step {step} from {ckpts.directory} (no optimizer state: '
      'the optimizer restarts)')
  return fresh.replace(step=jnp.asarray(step, jnp.int32), params=params)
