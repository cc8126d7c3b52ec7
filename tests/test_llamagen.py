"""LlamaGen import: our modules reproduce LlamaGen's own PyTorch outputs (golden files made by
scripts/llamagen_golden.py on tiny random models), and bad checkpoints are refused by name."""

import argparse
import json
import os
import sys
import types

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from ssd_jax import pretrained
from ssd_jax.importers import llamagen
from ssd_jax.models import layers

GOLDEN = os.path.join(os.path.dirname(__file__), 'golden', 'llamagen')
GPT = os.path.join(GOLDEN, 'gpt.safetensors')
VQ = os.path.join(GOLDEN, 'vq.safetensors')
TOL = 1e-4  # float32 against float32, both at full matmul precision


def run_import(out, gpt=GPT, *extra):
  return llamagen.main([f'--gpt={gpt}', '--image_size=80', '--num_heads=2', f'--out={out}',
                        *extra])


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('llamagen') / 'run')
  assert run_import(out, GPT, f'--vq={VQ}') == 0
  return out


@pytest.fixture(scope='module')
def ar(run_dir):
  return pretrained.load_stage(os.path.join(run_dir, 'ar'), 'ar')[:2]


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(os.path.join(GOLDEN, 'gpt.npz')))


def test_teacher_forced_logits_match_llamagen(ar, golden):
  model, params = ar
  with jax.default_matmul_precision('highest'):
    logits, _ = model.apply({'params': params}, golden['tokens'], golden['labels'])
  np.testing.assert_allclose(logits, golden['logits'], atol=TOL, rtol=0)


def greedy_cfg(model, params, cond, scale, interval):
  """LlamaGen's greedy CFG decoding on our KV cache: cond half first, the same token fed to
  both halves, guided while scale > 1 and (interval < 0 or token - 1 <= interval)."""
  b = len(cond)
  apply = lambda *a, method: model.apply({'params': params}, *a, method=method)
  labels = jnp.concatenate([cond, jnp.full((b,), model.null_class)])
  cache = model.init_cache(2 * b)
  with jax.default_matmul_precision('highest'):
    logits, _, cache = apply(apply(labels, method=model.condition), cache, method=model.prefill)
    decode = jax.jit(lambda t, s, c: apply(t, s, c, method=model.decode))
    tokens = []
    for i in range(model.num_tokens):
      c, u = jnp.split(logits[:, -1], 2)
      guided = scale > 1 and (interval < 0 or i - 1 <= interval)
      tokens.append(jnp.argmax(u + (c - u) * scale if guided else c, axis=-1))
      slot = model.prefix_len + i
      cache = cache.commit(jnp.full((2 * b,), slot))
      both = jnp.concatenate([tokens[-1], tokens[-1]])[:, None]
      logits, _, cache = decode(both, jnp.full((2 * b, 1), slot), cache)
  return np.stack(tokens, axis=1)


@pytest.mark.parametrize('name', ['tokens_cfg', 'tokens_cfg_interval', 'tokens_cond'])
def test_greedy_cfg_tokens_match_llamagen(ar, golden, name):
  scale = float(golden['cfg_scale']) if name != 'tokens_cond' else 1.0
  interval = int(golden['cfg_interval']) if name == 'tokens_cfg_interval' else -1
  tokens = greedy_cfg(*ar, jnp.asarray(golden['cond']), scale, interval)
  np.testing.assert_array_equal(tokens, golden[name])


def test_vq_decode_and_encode_match_llamagen(run_dir):
  tok, params, _ = pretrained.load_stage(os.path.join(run_dir, 'tokenizer'), 'tokenizer')
  vq = np.load(os.path.join(GOLDEN, 'vq.npz'))
  with jax.default_matmul_precision('highest'):
    pixels = tok.apply({'params': params}, vq['grid'], method=tok.decode)
    codes = tok.apply({'params': params}, vq['image'], method=tok.encode)
  np.testing.assert_allclose(pixels, vq['pixels'], atol=TOL, rtol=0)
  np.testing.assert_array_equal(codes, vq['codes'])


@pytest.mark.parametrize('name', ['GPT-B', 'GPT-3B', 'VQ-16'])
def test_key_map_matches_llamagen_at_full_size(name):
  """Every key and shape of LlamaGen's real architectures (keys.json, from its code)."""
  with open(os.path.join(GOLDEN, 'keys.json')) as f:
    theirs = {k: tuple(v) for k, v in json.load(f)[name].items()}
  state = {k: types.SimpleNamespace(shape=v) for k, v in theirs.items()}
  if name == 'VQ-16':
    spec, stage, key_fn, ignored = {'tokenizer': llamagen.vq_spec(state)}, 'tokenizer', \
        llamagen.vq_key, llamagen.VQ_IGNORED
    assert spec['tokenizer']['channel_mult'] == [1, 1, 2, 2, 4]
  else:
    spec, stage, key_fn, ignored = {'transformer': llamagen.gpt_spec(state, 256)}, 'ar', \
        llamagen.gpt_key, llamagen.GPT_IGNORED
  module = pretrained.MODULES[stage](spec)
  _, _, ours = llamagen.key_map(stage, module, key_fn)
  assert ours == {k: v for k, v in theirs.items() if k not in ignored}


def write_variant(path, change):
  state = load_file(GPT)
  change(state)
  save_file(state, path)
  return path


@pytest.mark.parametrize('change, named', [
    (lambda s: s.pop('layers.1.ffn_norm.weight'), 'layers.1.ffn_norm.weight'),
    (lambda s: s.update({'layers.0.attention.bias': np.zeros(3, np.float16)}),
     'layers.0.attention.bias'),
    (lambda s: s.update({'norm.weight': np.zeros(31, np.float16)}), 'norm.weight'),
])
def test_bad_keys_are_refused_by_name(tmp_path, capsys, change, named):
  gpt = write_variant(str(tmp_path / 'bad.safetensors'), change)
  assert run_import(str(tmp_path / 'run'), gpt) == 2
  err = capsys.readouterr().err.strip()
  assert named in err and err.count('\n') == 0
  assert not os.path.exists(tmp_path / 'run' / 'ar')


@pytest.mark.parametrize('args, says', [
    (['--image_size=72'], 'multiple of 16'),
    (['--num_heads=3'], 'head dim'),
    ([f'--vq={GPT}'], "'quantize.embedding.weight' missing"),
])
def test_bad_arguments_are_refused(tmp_path, capsys, args, says):
  assert run_import(str(tmp_path / 'run'), GPT, *args) == 2
  assert says in capsys.readouterr().err


def test_bfloat16_safetensors_import(tmp_path):
  gpt = write_variant(str(tmp_path / 'bf16.safetensors'), lambda s: s.update(
      {k: v.astype(ml_dtypes.bfloat16) for k, v in s.items()}))
  assert run_import(str(tmp_path / 'run'), gpt) == 0


def test_existing_run_is_not_overwritten(run_dir, capsys):
  assert run_import(run_dir) == 2
  assert 'already holds a checkpoint' in capsys.readouterr().err


def test_pickles_need_trust_and_ema_is_preferred(tmp_path, capsys, ar):
  torch = pytest.importorskip('torch')
  ema = {k: torch.from_numpy(v.astype(np.float32)) for k, v in load_file(GPT).items()}
  model = {k: torch.zeros_like(v) for k, v in ema.items()}
  path = str(tmp_path / 'train.pt')
  torch.save({'model': model, 'ema': ema, 'steps': 7, 'args': argparse.Namespace(lr=1)}, path)
  assert run_import(str(tmp_path / 'a'), path) == 2
  assert '--trust_pickle' in capsys.readouterr().err
  assert run_import(str(tmp_path / 'b'), path, '--trust_pickle') == 0
  _, params = pretrained.load_stage(str(tmp_path / 'b' / 'ar'), 'ar')[:2]
  jax.tree.map(np.testing.assert_array_equal, params, ar[1])  # the EMA weights
  torch.save({'model': model, 'ema': ema}, path)  # tensors only: no trust needed
  assert run_import(str(tmp_path / 'c'), path, '--weights=model') == 0


def test_pt_files_without_torch_say_what_to_install(tmp_path, capsys, monkeypatch):
  path = tmp_path / 'c2i_B_256.pt'
  path.write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as on a machine without torch
  assert run_import(str(tmp_path / 'run'), str(path)) == 2
  assert 'needs torch' in capsys.readouterr().err


def test_interleaved_rope_is_halves_rope_on_permuted_pairs():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))  # [B, T, H, Dh]
  angles = jax.random.normal(jax.random.key(1), (2, 5, 4))
  perm = jnp.array([0, 2, 4, 6, 1, 3, 5, 7])  # (x[2j], x[2j+1]) -> (x[j], x[j + 4])
  halves = layers.apply_rope(x[..., perm], angles)
  np.testing.assert_allclose(layers.apply_rope(x, angles, interleaved=True)[..., perm], halves,
                             atol=1e-6)
  keep = jnp.array([[False, True, True, True, True]] * 2)
  zeroed = layers.apply_rope(x, angles, interleaved=True, keep=keep)
  assert not np.any(zeroed[:, 0]) and np.allclose(zeroed[:, 1:], layers.apply_rope(
      x, angles, interleaved=True)[:, 1:])


def test_methods_without_trained_stages_run_on_an_imported_model(run_dir, tmp_path):
  """sample.py's job on the imported run: greedy sjd is greedy ar token for token (lossless
  on LlamaGen's RoPE and norms too), zipar and gsd run, images decode through VQ-16."""
  import helpers  # pylint: disable=g-import-not-at-top
  from ssd_jax import sample_job  # pylint: disable=g-import-not-at-top
  common = dict(checkpoint=run_dir, num_images=8, batch_size=8, temperature=0.0,
                cfg_scale=2.0, progress=False)
  tokens = {}
  for method in ('ar', 'sjd', 'zipar', 'gsd'):
    args = sample_job.SampleArgs(method=method, out=str(tmp_path / f'{method}.png'),
                                 tokens_out=str(tmp_path / f'{method}.npy'), **common)
    report = sample_job.run(args)
    tokens[method] = np.load(args.tokens_out)
    assert os.path.exists(args.out) and report['target_passes'] >= 1
  bundle = pretrained.load(run_dir)
  labels = np.arange(8) % bundle.model.num_classes
  helpers.assert_greedy_equal(bundle, tokens['sjd'], tokens['ar'], labels, 2.0, 'sjd')
