"""What the decoding tests share: tiny random bundles, decoding, exact enumeration and the
statistical checks that a sampler draws from exactly the target's distribution."""

import itertools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats as scipy_stats

from ssd_jax import pretrained
from ssd_jax import sharding
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.decoding import target as target_lib
from ssd_jax.models import heads as heads_lib
from ssd_jax.models import transformer
from ssd_jax.models import vq
from ssd_jax.training import checkpoint


def one_device_mesh():
  return sharding.make_mesh(1, 1, devices=jax.devices()[:1])


def bundle(model, params, tokenizer=None, tokenizer_params=None, **stages):
  """A Bundle from modules and params; stages: name=(module, params[, results])."""
  return pretrained.Bundle('tiny-random', tokenizer, tokenizer_params, model, params,
                           stages={name: pretrained.Stage(*stage) for name, stage in
                                   stages.items()})


def save_stage(stage_dir, spec, params, step=1):
  """A stage folder as training leaves it: model.json + an Orbax checkpoint at `step`."""
  ckpts = checkpoint.StageCheckpoints(str(stage_dir))
  ckpts.save(step, params, force=True)
  ckpts.wait()
  checkpoint.save_json(os.path.join(str(stage_dir), 'model.json'), spec)
  return stage_dir


def init_params(module, key, *args):
  """Plain (unboxed) params, initialised in one compile instead of op by op."""
  return sharding.strip_boxes(jax.jit(lambda k: module.init(k, *args)['params'])(key))


def tiny_model(vocab, grid, num_classes=3, num_layers=2, dim=32, num_heads=2, mlp_dim=64):
  return transformer.Transformer(vocab_size=vocab, num_classes=num_classes, grid=grid,
                                 num_layers=num_layers, dim=dim, num_heads=num_heads,
                                 mlp_dim=mlp_dim)


def model_params(model, key, sharpen=1.0, embed_scale=1.0):
  """Random params; `sharpen` scales the output layer (peaked logits: argmax near-ties
  between a one-token pass and a block pass become negligible), `embed_scale` the token
  embeddings (next-token distributions that depend on the context)."""
  params = init_params(model, key, jnp.zeros((1, model.num_tokens), jnp.int32),
                       jnp.zeros((1,), jnp.int32))
  params['lm_head']['kernel'] = params['lm_head']['kernel'] * sharpen
  params['token_embed']['embedding'] = params['token_embed']['embedding'] * embed_scale
  return params


def head_params(heads, key, copy=False):
  """Random neighbour-head params; copy=True pushes each head's first layer towards
  [I; 0] (predict the neighbour's state as the source's own), which a repetitive random
  model accepts often enough to test acceptance and rejection both."""
  params = init_params(heads, key, *pretrained.init_args('heads', heads))
  if not copy:
    return params
  def eye(rows):  # rows = (2 + 2 * context [+ 1 with chain]) * D
    return jnp.concatenate([jnp.eye(heads.dim), jnp.zeros((rows - heads.dim, heads.dim))])

  return {name: dict(p, w0={'kernel': p['w0']['kernel'] + eye(p['w0']['kernel'].shape[0])})
          for name, p in params.items()}


def heads_teacher_forced(bundle, tokens, labels):
  """Hidden states [1, B, N, D] that predicted each token, and the heads' training-time
  drafts q [B, N, K, V] (no CFG, temperature 1) on the grids `tokens` [B, N]."""
  from ssd_jax.training import heads_stage  # pylint: disable=g-import-not-at-top
  model, stage = bundle.model, bundle.stage('heads')
  tokens, labels = jnp.asarray(tokens), jnp.asarray(labels)
  pred, _, _ = heads_stage.head_outputs(model, stage.module, bundle.params, stage.params,
                                        tokens, labels)
  _, hidden = model.apply({'params': bundle.params}, tokens, labels)
  logits = model.apply({'params': bundle.params}, pred, method=model.logits_from_hidden)
  return hidden[None], jax.nn.softmax(logits, -1)


def heads_bundle(vocab, grid, seed=0, sharpen=8.0, embed_scale=1.0, num_horizontal=3,
                 copy=True, num_layers=2, dim=32, num_heads=2, mlp_dim=64, with_codes=False,
                 context=0, chain=False):
  """A random backbone with neighbour heads (and a random codebook when with_codes)."""
  keys = jax.random.split(jax.random.key(seed), 3)
  model = tiny_model(vocab, grid, num_layers=num_layers, dim=dim, num_heads=num_heads,
                     mlp_dim=mlp_dim)
  heads = heads_lib.NeighbourHeads(num_horizontal=num_horizontal, num_vertical=1, dim=dim,
                                   mlp_dim=32, context=context, chain=chain)
  tok = tok_params = None
  if with_codes:  # only the codebook is read by the methods that measure in it
    tok = vq.VQTokenizer(codebook_size=vocab, code_dim=4, channels=8, num_res_blocks=1)
    tok_params = {'codebook': jax.random.normal(keys[2], (vocab, 4))}
  return bundle(model, model_params(model, keys[0], sharpen, embed_scale), tok, tok_params,
                heads=(heads, head_params(heads, keys[1], copy)))


def decode(bundle_, method, sampling, labels, keys=None, options=None, mesh=None):
  """(tokens [B, N], stats) as numpy, through engine.build_decoder (compiled once per
  setting and kept on the bundle)."""
  keys = engine.image_keys(0, 0, len(labels)) if keys is None else keys
  decoder = engine.build_decoder(bundle_, method, sampling, options, mesh or one_device_mesh())
  tokens, stats = decoder(np.asarray(labels), keys)
  return np.asarray(tokens), jax.tree.map(np.asarray, stats)


# --- greedy equality up to near-ties --------------------------------------------------

NEAR_TIE = 1e-3  # guided logits this close: float noise between passes may flip the argmax
MAX_NEAR_TIES = 2  # more differing samples than this is a failure, near-ties or not


def guided_logits(bundle_, tokens, labels, cfg_scale):
  """Teacher-forced guided logits [B, N, V] of token grids [B, N] (float32, highest)."""
  model = bundle_.model
  groups = [labels] + ([np.full_like(labels, model.null_class)] if cfg_scale != 1 else [])
  with jax.default_matmul_precision('highest'):
    logits = jnp.stack([model.apply({'params': bundle_.params}, jnp.asarray(tokens),
                                    jnp.asarray(g))[0] for g in groups])
  return np.asarray(sampling_lib.guide(logits, cfg_scale))


def assert_greedy_equal(bundle_, got, want, labels, cfg_scale, what=''):
  """Greedy `got` equals `want` (AR) token for token, except in samples whose first
  differing token is a near-tie of the guided logits of `want`'s prefix (same prefix,
  same distribution); at most MAX_NEAR_TIES such samples. Returns their number."""
  got, want = np.asarray(got).reshape(len(labels), -1), np.asarray(want).reshape(len(labels), -1)
  differing = [b for b in range(len(labels)) if (got[b] != want[b]).any()]
  if not differing:
    return 0
  logits = guided_logits(bundle_, want, labels, cfg_scale)
  for b in differing:
    i = int(np.argmax(got[b] != want[b]))
    top2 = np.sort(logits[b, i])[-2:]
    assert top2[1] - top2[0] < NEAR_TIE, (
        f'{what}: sample {b} differs from AR at token {i}, where the top-2 guided logits '
        f'are {top2[1] - top2[0]:.3g} apart: not a near-tie')
  print(f'{what}: {len(differing)} near-tie samples differ from AR')
  assert len(differing) <= MAX_NEAR_TIES, f'{what}: {len(differing)} near-ties is too many'
  return len(differing)


# --- exact enumeration and the statistical checks ---------------------------------------

def all_grids(vocab, num_tokens):
  return np.array(list(itertools.product(range(vocab), repeat=num_tokens)), np.int32)


def exact_distribution(bundle_, sampling, label):
  """P(grid) [V ** N] of every grid (all_grids order) under the processed target, by
  teacher forcing through Target.probs (CFG, temperature, top-k, top-p as decoding)."""
  model = bundle_.model
  grids = jnp.asarray(all_grids(model.vocab_size, model.num_tokens))
  target = target_lib.Target(model, sampling)
  groups = [label, model.null_class][:target.groups]  # [cond; uncond] as decoding runs it
  apply = jax.jit(lambda g: model.apply({'params': bundle_.params}, grids,
                                        jnp.full((len(grids),), g))[0])
  logits = jnp.stack([apply(g) for g in groups])
  per_token = jnp.take_along_axis(target.probs(logits), grids[..., None], -1)[..., 0]
  p = np.prod(np.asarray(per_token, np.float64), -1)
  np.testing.assert_allclose(p.sum(), 1.0, atol=1e-4)
  return p / p.sum()  # float32 rounding; multinomial needs a sum <= 1


def tv_bound(p, n, reps=300):
  """The largest TV a correct sampler plausibly shows with n samples from p: the mean + 6
  sd of multinomial(n, p) draws' TV (simulated; close to normal, as it sums many nearly
  independent cells), exceeded by an exact sampler with probability ~1e-9."""
  rng = np.random.default_rng(0)
  null = 0.5 * np.abs(rng.multinomial(n, p, size=reps) / n - p).sum(-1)
  return null.mean() + 6 * null.std()


def _chi2_pvalue(observed, expected, min_expected=5.0):
  """Pearson chi-square p-value; cells expecting fewer than min_expected are pooled."""
  small = expected < min_expected
  obs = np.append(observed[~small], observed[small].sum())
  exp = np.append(expected[~small], expected[small].sum())
  keep = exp > 0
  obs, exp = obs[keep], exp[keep]
  if len(exp) < 2:
    return 1.0
  return float(scipy_stats.chi2.sf(np.sum((obs - exp) ** 2 / exp), len(exp) - 1))


def distribution_report(tokens, p, vocab, alpha=1e-6):
  """How n sampled grids tokens [n, N] compare with the exact distribution p [V ** N].

  Four checks, each of which a correct sampler fails with probability <= alpha:
    * joint: total variation against `tv_bound`;
    * per-position marginals: chi-square per position (N tests);
    * pairwise marginals: chi-square per pair of positions (N (N - 1) / 2 tests);
    * mean log-probability of the samples against its exact value sum p log p (a z-test):
      small shifts of mass towards likely or unlikely grids show here first.
  The marginal tests are Bonferroni-corrected. Returns {check: (statistic, passed)}.
  """
  n, num_tokens = tokens.shape
  grids = all_grids(vocab, num_tokens)
  index = tokens @ (vocab ** np.arange(num_tokens - 1, -1, -1))
  freq = np.bincount(index, minlength=len(p)) / n
  tv, bound = 0.5 * np.abs(freq - p).sum(), tv_bound(p, n)
  tests = num_tokens + num_tokens * (num_tokens - 1) // 2
  level = alpha / tests
  worst_single = min(_chi2_pvalue(np.bincount(tokens[:, i], minlength=vocab),
                                  n * np.bincount(grids[:, i], weights=p, minlength=vocab))
                     for i in range(num_tokens))
  worst_pair = min(
      _chi2_pvalue(np.bincount(tokens[:, i] * vocab + tokens[:, j], minlength=vocab ** 2),
                   n * np.bincount(grids[:, i] * vocab + grids[:, j], weights=p,
                                   minlength=vocab ** 2))
      for i, j in itertools.combinations(range(num_tokens), 2))
  logp = np.log(np.maximum(p, 1e-300))
  mean = np.sum(p * logp)
  sd = math.sqrt(max(np.sum(p * logp ** 2) - mean ** 2, 1e-30) / n)
  z = (np.mean(logp[index]) - mean) / sd
  z_crit = scipy_stats.norm.isf(alpha / 2)
  return {'tv': (tv, tv <= bound), 'marginal_p': (worst_single, worst_single > level),
          'pairwise_p': (worst_pair, worst_pair > level), 'logprob_z': (z, abs(z) < z_crit)}


def format_report(report):
  return ', '.join(f'{k} {v:.3g}{"" if ok else " FAIL"}' for k, (v, ok) in report.items())

def fresh(bundle_):
  """A copy of a bundle without its compiled decoders (e.g. after injecting a rule)."""
  return pretrained.Bundle(bundle_.run_dir, bundle_.tokenizer, bundle_.tokenizer_params,
                           bundle_.model, bundle_.params, bundle_.class_names,
                           dict(bundle_.stages))
