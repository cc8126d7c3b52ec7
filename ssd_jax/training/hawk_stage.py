"""Stage `hawk_draft`: the Hawk draft model distilled against the frozen AR backbone.

One teacher-forced backbone pass per batch gives hidden[:, j] (the state that predicts
token j) and the backbone's p_j. The drafter predicts hidden[:, j] horizontally (from
j - 1 and its row-causal window) and vertically (from the rows above only); the loss is
Smooth-L1 to the backbone's hidden state plus ce_weight * cross-entropy of
lm_head(final_norm(prediction)) towards p_j (the KL up to p's entropy). A second
horizontal pass feeds the drafter its own first-pass predictions at the 1..chain_depth-1
positions before j in its row (random per position), as when it drafts the later steps of
its chain during decoding, where those states are its own guesses.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax import pretrained
from ssd_jax.training import ar_stage
from ssd_jax.training import inputs as inputs_lib

MODES = ('horizontal', 'horizontal_chain', 'vertical')


def valid_positions(grid):
  """[3, N] bool: positions each mode drafts (not token 0; vertical not on row 0)."""
  n = grid[0] * grid[1]
  hor = np.arange(n) >= 1
  return jnp.asarray(np.stack([hor, hor, np.arange(n) >= grid[1]]))


def drafts(model, drafter, backbone, params, tokens, labels, fed_depth):
  """-> (predictions [3, B, N, D] in MODES order, backbone hidden [B, N, D])."""
  _, hidden = model.apply({'params': backbone}, tokens, labels)
  hidden = jax.lax.stop_gradient(hidden)
  emb = model.apply({'params': backbone}, tokens, method=model.embed_tokens)
  apply = lambda *args, method: drafter.apply({'params': params}, *args, method=method)
  hor = apply(hidden, emb, method=drafter.horizontal)
  chain = apply(hidden, emb, jax.lax.stop_gradient(hor), fed_depth, method=drafter.horizontal)
  ver = apply(hidden, emb, method=drafter.vertical)
  return jnp.stack([hor, chain, ver]), hidden


def make_stage(config, workdir):
  tok_dir = ar_stage.earlier_stage_dir(config.tokenizer_dir, workdir, 'tokenizer')
  ar_dir = ar_stage.earlier_stage_dir(config.ar_dir, workdir, 'ar')
  tokenizer, tok_params, tok_spec = pretrained.load_stage(tok_dir, 'tokenizer')
  model, backbone, ar_spec = pretrained.load_stage(ar_dir, 'ar')
  spec = dict(dim=model.dim, grid=list(model.grid), **config.hawk.to_dict())
  ce_weight, null_fraction = spec.pop('ce_weight'), spec.pop('null_fraction')
  chain_depth = spec.pop('chain_depth')
  drafter = pretrained.hawk_module({'hawk_draft': spec})
  from ssd_jax.training import loop  # pylint: disable=g-import-not-at-top
  inputs = inputs_lib.StageInputs(config, workdir, tokenizer, tok_spec, tok_params, model,
                                  log=loop.log)
  logits_fn = lambda p, h: model.apply({'params': p}, h, method=model.logits_from_hidden)
  valid = valid_positions(model.grid)

  def init_params(key):
    return drafter.init(key, *pretrained.init_args('hawk_draft', drafter))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del extra
    k_null, k_depth = jax.random.split(key)
    tokens = inputs.grids(frozen['tokenizer'], batch)
    # Some null-class grids: CFG drafts from the unconditional half too.
    labels = jnp.where(jax.random.bernoulli(k_null, null_fraction, batch['label'].shape),
                       model.null_class, batch['label'])
    depth = jax.random.randint(k_depth, tokens.shape, 1, max(chain_depth, 2))
    pred, hidden = drafts(model, drafter, frozen['backbone'], params, tokens, labels, depth)
    weight = jnp.broadcast_to(valid[:, None], pred.shape[:3]).astype(jnp.float32)
    if chain_depth < 2:  # no chain: only its first step is ever drafted
      weight = weight.at[1].set(0.0)
    mean = lambda x: jnp.sum(x * weight) / jnp.sum(weight)
    l1 = mean(jnp.mean(optax.huber_loss(pred, hidden[None]), -1))
    p = jax.nn.softmax(logits_fn(frozen['backbone'], hidden))            # [B, N, V]
    q_logits = logits_fn(frozen['backbone'], pred)                       # [3, B, N, V]
    ce = mean(-jnp.sum(p * jax.nn.log_softmax(q_logits), -1))
    accept = jnp.sum(jnp.minimum(p, jax.nn.softmax(q_logits)), -1)       # [3, B, N]
    per_mode = jnp.sum(accept * weight, (1, 2)) / jnp.maximum(jnp.sum(weight, (1, 2)), 1.0)
    metrics = {'smooth_l1': l1, 'ce': ce}
    metrics.update({f'accept_{m}': a for m, a in zip(MODES, per_mode)})
    loss = metrics['smooth_l1'] + ce_weight * metrics['ce']
    return loss, (metrics, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del stage_dir, mesh
    return evaluate_drafter(model, drafter, frozen['backbone'], params,
                            lambda batch: inputs.grids(frozen['tokenizer'], batch),
                            inputs.eval_data(), chain_depth)

  return loop.Stage(name='hawk_draft', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate,
                    # Cached tokens need no encoder on the devices (VQ-16: 0.3 GB).
                    frozen={'tokenizer': {} if inputs.cache else tok_params,
                            'backbone': backbone},
                    spec={'hawk_draft': spec, 'backbone': ar_spec['transformer']},
                    num_heads=spec['num_heads'], train_source=inputs.train_source)


def evaluate_drafter(model, drafter, backbone, params, grids, data, chain_depth,
                     batch_size=250):
  """Per mode on held-out grids: top-1 agreement with the backbone and sum(min(p, q)).
  `grids` maps a batch of `data` ({'image' or 'tokens', 'label'}) to [B, H*W] tokens.

  `horizontal_chain` feeds the drafter its own states at the chain_depth - 1 positions
  before each one in its row: the chain's last step (horizontal is its first).
  """
  valid = valid_positions(model.grid)

  @jax.jit
  def batch_stats(batch):
    tokens, labels = grids(batch), batch['label']
    depth = jnp.full(tokens.shape, chain_depth - 1)
    pred, hidden = drafts(model, drafter, backbone, params, tokens, labels, depth)
    logits = lambda h: model.apply({'params': backbone}, h, method=model.logits_from_hidden)
    p, q = jax.nn.softmax(logits(hidden)), jax.nn.softmax(logits(pred))
    agree = (jnp.argmax(p, -1) == jnp.argmax(q, -1)).astype(jnp.float32)  # [3, B, N]
    accept = jnp.sum(jnp.minimum(p, q), -1)
    w = jnp.broadcast_to(valid[:, None], agree.shape).astype(jnp.float32)
    return jnp.sum(agree * w, (1, 2)), jnp.sum(accept * w, (1, 2)), jnp.sum(w, (1, 2))

  sums = [np.zeros(len(MODES)) for _ in range(3)]
  for i in range(0, len(data['label']), batch_size):
    out = batch_stats({k: v[i:i + batch_size] for k, v in data.items()})
    for s, o in zip(sums, out):
      s += np.asarray(o)
  agree, accept, count = sums
  return {m: {'top1_agreement': float(a / c), 'acceptance': float(p / c)}
          for m, a, p, c in zip(MODES, agree, accept, count)}
