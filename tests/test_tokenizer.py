"""VQ tokenizer: training signal, shapes, straight-through gradients, dead-code restart."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tokenizer as tokenizer_config
from ssd_jax.models import vq
from ssd_jax.training import loop
from ssd_jax.training import tokenizer_stage

CODES = 16


@pytest.fixture(scope='module')
def config():
  config = tokenizer_config.get_config('smoke')
  config.vq.codebook_size = CODES
  config.vq.code_dim = 8
  config.vq.restart_every = 3
  return config


@pytest.fixture(scope='module')
def stage(config):
  return tokenizer_stage.make_stage(config)


@pytest.fixture(scope='module')
def model(config):
  return tokenizer_stage.tokenizer_from_config(config.vq, config.data.channels)


@pytest.fixture(scope='module')
def params(stage):
  # Partitionable threefry makes XLA:CPU take ~5 s to compile each 4D conv-kernel draw;
  # these tests need no sharding-invariant init.
  with jax.threefry_partitionable(False):
    return jax.jit(stage.init_params)(jax.random.key(0))


@pytest.fixture(scope='module')
def batch():
  """A fixed batch of 8 smooth 28x28 images (blobs at random places)."""
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[:28, :28]
  centres = rng.uniform(6, 22, (8, 2, 1, 1))
  images = 255 * np.exp(-((yy - centres[:, 0]) ** 2 + (xx - centres[:, 1]) ** 2) / 30)
  return {'image': images[..., None].astype(np.uint8), 'label': np.arange(8, dtype=np.int32)}


def test_loss_falls_on_a_fixed_batch(stage, params, batch):
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt):
    (loss, _), grads = jax.value_and_grad(stage.loss_fn, has_aux=True)(
        p, None, batch, jax.random.key(0), {})
    updates, opt = tx.update(grads, opt, p)
    return optax.apply_updates(p, updates), opt, loss

  p, opt, losses = params, tx.init(params), []
  for _ in range(6):
    p, opt, loss = step(p, opt)
    losses.append(float(loss))
  assert losses[-1] < 0.8 * losses[0], losses


def test_encode_decode_shapes_and_dtypes(model, params, batch):
  @jax.jit
  def roundtrip(p):
    images = vq.images_to_unit(batch['image'])
    tokens = model.apply({'params': p}, images, method=model.encode)
    recon, aux = model.apply({'params': p}, images)
    return tokens, model.apply({'params': p}, tokens, method=model.decode), recon, aux['tokens']

  tokens, decoded, recon, call_tokens = roundtrip(params)
  assert tokens.shape == (8, 14, 14) and tokens.dtype == jnp.int32
  assert 0 <= int(tokens.min()) and int(tokens.max()) < CODES
  assert decoded.shape == (8, 28, 28, 1) and decoded.dtype == jnp.float32
  np.testing.assert_array_equal(call_tokens, tokens)
  # The straight-through value is the quantized one: decode(encode(x)) is the reconstruction.
  np.testing.assert_allclose(decoded, recon, atol=1e-5)


def test_space_to_depth_roundtrip():
  x = jnp.arange(2 * 28 * 28 * 3, dtype=jnp.float32).reshape(2, 28, 28, 3)
  for f in (2, 4):
    y = vq.space_to_depth(x, f)
    assert y.shape == (2, 28 // f, 28 // f, f * f * 3)
    np.testing.assert_array_equal(vq.depth_to_space(y, f), x)
  # Each output cell holds exactly its own f x f patch.
  np.testing.assert_array_equal(vq.space_to_depth(x, 2)[0, 1, 2].reshape(2, 2, 3),
                                x[0, 2:4, 4:6])


def test_straight_through_gradients(model, params, batch):
  images = vq.images_to_unit(batch['image'])

  def losses(p):  # [3]: reconstruction, codebook, commitment
    recon, aux = model.apply({'params': p}, images)
    return jnp.stack([jnp.mean((recon - images) ** 2), aux['codebook_loss'],
                      aux['commit_loss']])

  jac = jax.jit(jax.jacrev(losses))(params)  # leaves [3, ...]
  grads = {k: jax.tree.map(lambda g, i=i: g[i], jac)
           for i, k in enumerate(('rec', 'codebook', 'commit'))}
  # The reconstruction loss reaches every encoder kernel through the quantizer ...
  for path, g in jax.tree_util.tree_leaves_with_path(grads['rec']['encoder']):
    if 'kernel' in jax.tree_util.keystr(path):
      assert float(jnp.abs(g).max()) > 0, jax.tree_util.keystr(path)
  # ... and skips the codebook (straight-through); the codebook loss moves only the codes,
  # the commitment loss only the encoder.
  assert float(jnp.abs(grads['rec']['codebook']).max()) == 0
  assert float(jnp.abs(grads['codebook']['codebook']).max()) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads['codebook']['encoder']))
  assert float(jnp.abs(grads['commit']['codebook']).max()) == 0
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads['commit']['encoder']))


def test_restart_replaces_exactly_the_dead_codes():
  rng = np.random.default_rng(0)
  codebook = jnp.asarray(rng.normal(size=(CODES, 8)), jnp.float32)
  usage = jnp.asarray(rng.integers(0, 3, CODES))
  latents = jnp.asarray(rng.normal(size=(50, 8)), jnp.float32)
  new, count = jax.jit(vq.restart_dead_codes)(codebook, usage, latents, jax.random.key(0))
  dead = np.asarray(usage) == 0
  assert 0 < dead.sum() < CODES and int(count) == dead.sum()
  np.testing.assert_array_equal(new[~dead], codebook[~dead])
  # A restarted code sits next to one of the batch's latents.
  dist = np.linalg.norm(np.asarray(new)[dead][:, None] - np.asarray(latents)[None], axis=-1)
  assert (dist.min(1) < 0.1).all() and (np.asarray(new)[dead] != codebook[dead]).all()


def test_stage_restarts_dead_codes_every_restart_every_steps(stage, params, config):
  k = config.vq.restart_every
  used = np.arange(CODES) % 2 == 0
  tokens = jnp.asarray(np.flatnonzero(used)[np.arange(8 * 14 * 14) % used.sum()]).reshape(
      8, 14, 14)
  aux = {'tokens': tokens, 'latents': jnp.ones((8, 14, 14, config.vq.code_dim))}
  post_update = jax.jit(stage.post_update)

  def state_at(step):
    return loop.TrainState(step=jnp.asarray(step, jnp.int32), params=params, opt_state=None,
                           extra={'usage': jnp.zeros((CODES,), jnp.int32)})

  before = params['codebook']
  between = post_update(state_at(k - 1), aux, jax.random.key(0))
  np.testing.assert_array_equal(between.params['codebook'], before)
  assert (np.asarray(between.extra['usage']) > 0).sum() == used.sum()  # counts accumulate

  due = post_update(state_at(k), aux, jax.random.key(0))
  codebook = np.asarray(due.params['codebook'])
  np.testing.assert_array_equal(codebook[used], before[used])
  assert (codebook[~used] != before[~used]).all()
  assert int(due.extra['usage'].sum()) == 0  # counting starts again after a restart


def test_psnr_and_codebook_usage():
  x = np.zeros((2, 28, 28, 1), np.float32)
  psnr = jax.jit(vq.psnr)
  assert float(psnr(x, x)) == pytest.approx(100.0)
  # 0.2 on the [-1, 1] scale is 0.1 on [0, 1]: mse 0.01, 20 dB.
  assert float(psnr(x + 0.2, x)) == pytest.approx(20.0, abs=1e-3)
  used, perplexity = jax.jit(vq.codebook_usage, static_argnums=1)(np.array([[0, 0, 1, 1]]), 4)
  assert float(used) == 0.5 and float(perplexity) == pytest.approx(2.0)
