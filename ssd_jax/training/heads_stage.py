"""Stage `heads`: neighbour heads distilled against the frozen AR backbone.

Targets come from one teacher-forced backbone pass over a data grid: hidden[:, i] is the
pre-norm state that predicts token i, so for source position (y, x) the horizontal head k
regresses hidden at (y, x + k) and the vertical head k hidden at (y + k, x) (Smooth-L1),
plus optionally a cross-entropy towards the backbone's token distribution there. Heads with
`context` also get the states and embeddings of committed positions next to their target
(models/heads.py). `init_from` warm-starts from trained heads with less (or no) context:
the new input rows of W0 start at zero, so training begins exactly where those heads stand.

Two options bring training closer to what decoding asks of the heads:
  * `cfg_scale` > 1: every grid runs under its class and the null class, and the
    cross-entropy is between the CFG-guided p and the guided draft q (what the engine
    verifies with), not between the conditional ones; `null_fraction` is then unused.
  * `samples` > 0: train on that many of the backbone's own AR samples (drawn once at
    `cfg_scale`, training/self_samples.py) instead of the dataset's grids.
"""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.models import heads as heads_lib
from ssd_jax.training import ar_stage
from ssd_jax.training import inputs as inputs_lib
from ssd_jax.training import self_samples


def head_names(heads):
  return ([f'horizontal_{k + 1}' for k in range(heads.num_horizontal)]
          + [f'vertical_{k + 1}' for k in range(heads.num_vertical)])


def neighbour_targets(x, grid, heads):
  """x [B, N, ...] -> ([B, N, K, ...] value at each head's neighbour, [N, K] validity)."""
  h, w = grid
  rows, cols = np.divmod(np.arange(h * w), w)
  idx, valid = [], []
  for k in range(1, heads.num_horizontal + 1):
    idx.append(np.minimum(np.arange(h * w) + k, h * w - 1))
    valid.append(cols + k < w)
  for k in range(1, heads.num_vertical + 1):
    idx.append(np.minimum(np.arange(h * w) + k * w, h * w - 1))
    valid.append(rows + k < h)
  idx = np.stack(idx, 1)  # [N, K]
  return x[:, idx], jnp.asarray(np.stack(valid, 1))


def head_outputs(model, heads, backbone, head_params, tokens, labels):
  """(predicted hidden [B, N, K, D], target hidden [B, N, K, D], target logits, valid)."""
  _, hidden = model.apply({'params': backbone}, tokens, labels)
  hidden = jax.lax.stop_gradient(hidden)
  emb = model.apply({'params': backbone}, tokens, method=model.embed_tokens)
  if heads.context:
    idx, ok = heads_lib.context_index(model.grid, heads.num_horizontal, heads.num_vertical,
                                      heads.context)
    ok = jnp.asarray(ok)[None, ..., None]                                # [1, N, K, C, 1]
    ctx = (hidden[:, idx] * ok, emb[:, idx] * ok)                         # [B, N, K, C, D]
  else:
    ctx = (None, None)
  left = ()
  if heads.chain:
    idx, ok = heads_lib.left_index(model.grid, heads.num_horizontal, heads.num_vertical)
    left = (emb[:, idx] * jnp.asarray(ok)[None, ..., None],)              # [B, N, K, D]
  hor, ver = heads.apply({'params': head_params}, hidden, emb, *ctx, *left)
  pred = jnp.concatenate([hor, ver], axis=2)
  target, valid = neighbour_targets(hidden, model.grid, heads)
  return pred, target, valid


def both_groups(model, heads, backbone, head_params, tokens, labels, cfg_scale):
  """head_outputs plus logits, over [cond; null] copies of the grids when cfg_scale > 1 (the
  engine's CFG group order): (pred, target [G*B, N, K, D], q_logits, p_logits [G*B, N, K, V],
  valid [N, K], guide: [G*B, ...] logits -> guided [B, ...])."""
  groups = 2 if cfg_scale > 1 else 1
  if groups == 2:
    tokens = jnp.concatenate([tokens, tokens])
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.null_class)])
  pred, target, valid = head_outputs(model, heads, backbone, head_params, tokens, labels)
  logits = lambda h: model.apply({'params': backbone}, h, method=model.logits_from_hidden)
  guide = lambda x: sampling_lib.guide(x.reshape((groups, -1) + x.shape[1:]), cfg_scale)
  return pred, target, logits(pred), logits(target), valid, guide


def distill_losses(model, heads, backbone, head_params, tokens, labels, cfg_scale=1.0):
  """tokens [B, N], labels [B] -> (Smooth-L1 to the backbone's hidden states, cross-entropy
  from the backbone's p to the heads' q), averaged over every head's valid positions. With
  cfg_scale > 1 the grids also run under the null class and the cross-entropy is between the
  guided distributions."""
  pred, target, q_logits, p_logits, valid, guide = both_groups(
      model, heads, backbone, head_params, tokens, labels, cfg_scale)
  weight = jnp.broadcast_to(valid[None], pred.shape[:3]).astype(jnp.float32)  # [G*B, N, K]
  l1 = jnp.sum(jnp.mean(optax.huber_loss(pred, target), -1) * weight) / jnp.sum(weight)
  p_logits, q_logits = guide(p_logits), guide(q_logits)                  # [B, N, K, V]
  weight = weight[:p_logits.shape[0]]
  ce = -jnp.sum(jax.nn.softmax(p_logits) * jax.nn.log_softmax(q_logits), -1)  # [B, N, K]
  return l1, jnp.sum(ce * weight) / jnp.sum(weight)


def make_stage(config, workdir):
  tok_dir = ar_stage.earlier_stage_dir(config.tokenizer_dir, workdir, 'tokenizer')
  ar_dir = ar_stage.earlier_stage_dir(config.ar_dir, workdir, 'ar')
  tokenizer, tok_params, tok_spec = pretrained.load_stage(tok_dir, 'tokenizer')
  model, backbone, ar_spec = pretrained.load_stage(ar_dir, 'ar')
  spec = dict(dim=model.dim, **config.heads.to_dict())
  ce_weight, null_fraction = spec.pop('ce_weight'), spec.pop('null_fraction')
  init_from = spec.pop('init_from', '')
  cfg_scale, num_samples = spec.pop('cfg_scale', 1.0), spec.pop('samples', 0)
  samples_dir = spec.pop('samples_dir', '') or os.path.join(workdir, 'self_samples')
  samples_seed = spec.pop('samples_seed', 7777)
  if not cfg_scale >= 1 or num_samples < 0:
    raise ValueError(f'--config.heads.cfg_scale={cfg_scale} must be >= 1 (1 = no guidance) '
                     f'and --config.heads.samples={num_samples} >= 0 (0 = the dataset).')
  heads = pretrained.heads_module({'heads': spec})
  # Loaded here, not inside init_params (which runs under jit); checked against these heads'
  # shapes now, so a mismatch is refused before any training.
  trained = pretrained.load_stage(init_from, 'heads')[1] if init_from else None
  from ssd_jax.training import loop  # pylint: disable=g-import-not-at-top
  if trained is not None:
    loop.log(f'[heads] a fresh run starts from the heads in {init_from} (a checkpoint of '
             'this run, if any, still wins)')
    jax.eval_shape(lambda: warm_start(
        jax.eval_shape(heads.init, jax.random.key(0),
                       *pretrained.init_args('heads', heads))['params'], trained, init_from))
  inputs = inputs_lib.StageInputs(config, workdir, tokenizer, tok_spec, tok_params, model,
                                  log=loop.log)
  def init_params(key):
    params = heads.init(key, *pretrained.init_args('heads', heads))['params']
    return params if trained is None else warm_start(params, trained, init_from)

  def loss_fn(params, frozen, batch, key, extra):
    del extra
    labels = batch['label']
    if cfg_scale == 1:  # some null-class grids: CFG drafts from the unconditional half too
      labels = jnp.where(jax.random.bernoulli(key, null_fraction, labels.shape),
                         model.null_class, labels)
    l1, ce = distill_losses(model, heads, frozen['backbone'], params,
                            inputs.grids(frozen['tokenizer'], batch), labels, cfg_scale)
    metrics = {'smooth_l1': l1, 'ce': ce}
    return l1 + ce_weight * ce, (metrics, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del stage_dir, mesh
    return evaluate_heads(model, heads, frozen['backbone'], params,
                          lambda batch: inputs.grids(frozen['tokenizer'], batch),
                          inputs.eval_data(), cfg_scale=cfg_scale)

  train_source = inputs.train_source
  if num_samples:
    train_source = lambda: self_samples.source(
        model, backbone, ar_spec['transformer'], num_samples, cfg_scale, samples_seed,
        samples_dir, log=loop.log)

  return loop.Stage(name='heads', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate,
                    # Cached tokens need no encoder on the devices (VQ-16: 0.3 GB).
                    frozen={'tokenizer': {} if inputs.cache else tok_params,
                            'backbone': backbone},
                    spec={'heads': spec, 'backbone': ar_spec['transformer']},
                    train_source=train_source)


def evaluate_heads(model, heads, backbone, head_params, grids, data, batch_size=250,
                   cfg_scale=1.0):
  """Per head on held-out grids: top-1 agreement with the backbone and sum(min(p, q)), and
  with cfg_scale > 1 also sum(min(p, q)) of the guided p and q (`acceptance_cfg`).
  `grids` maps a batch of `data` ({'image' or 'tokens', 'label'}) to [B, H*W] tokens."""

  @jax.jit
  def batch_stats(batch):
    labels = batch['label']
    _, _, q_logits, p_logits, valid, guide = both_groups(
        model, heads, backbone, head_params, grids(batch), labels, cfg_scale)
    b = labels.shape[0]
    q, p = jax.nn.softmax(q_logits[:b]), jax.nn.softmax(p_logits[:b])   # [B, N, K, V]
    agree = (jnp.argmax(p, -1) == jnp.argmax(q, -1)).astype(jnp.float32)  # [B, N, K]
    accept = [jnp.sum(jnp.minimum(p, q), -1)]
    if cfg_scale > 1:
      accept.append(jnp.sum(jnp.minimum(jax.nn.softmax(guide(p_logits)),
                                        jax.nn.softmax(guide(q_logits))), -1))
    w = jnp.broadcast_to(valid[None], agree.shape).astype(jnp.float32)
    return [jnp.sum(x * w, (0, 1)) for x in [agree, w] + accept]

  sums = None
  for i in range(0, len(data['label']), batch_size):
    out = [np.asarray(o) for o in batch_stats({k: v[i:i + batch_size]
                                               for k, v in data.items()})]
    sums = out if sums is None else [s + o for s, o in zip(sums, out)]
  agree, count, accept = sums[:3]
  results = {name: {'top1_agreement': float(a / c), 'acceptance': float(p / c)}
             for name, a, p, c in zip(head_names(heads), agree, accept, count)}
  if cfg_scale > 1:
    for name, p, c in zip(head_names(heads), sums[3], count):
      results[name]['acceptance_cfg'] = float(p / c)
  return results


def warm_start(params, trained, heads_dir):
  """`params` (boxed, as init makes them) with every tensor taken from `trained` (the heads
  in heads_dir); W0 kernels that grew (context inputs) keep the trained rows and start at
  zero in the new ones."""

  def take(new, old):
    if new.shape == old.shape:
      return jnp.asarray(old, new.dtype)
    if new.ndim == 2 and new.shape[1] == old.shape[1] and new.shape[0] > old.shape[0]:
      return jnp.zeros_like(new).at[:old.shape[0]].set(old)
    raise ValueError(f'--config.heads.init_from={heads_dir}: a tensor of shape {old.shape} '
                     f'cannot start one of shape {new.shape}; the heads must match in count '
                     'and width (only context inputs may be added).')

  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  try:
    new = jax.tree.map(take, sharding.strip_boxes(params), trained)
  except ValueError as e:
    if 'init_from' in str(e):
      raise
    raise ValueError(f'--config.heads.init_from={heads_dir}: its heads do not match these '
                     '(number of heads or layers); train from scratch instead.') from e
  return jax.tree.map(lambda box, v: box.replace_boxed(v) if is_box(box) else v, params, new,
                      is_leaf=is_box)
