"""Imports LlamaGen's class-conditional GPTs (and its VQ-16 tokenizer) as a run folder.

  python -m ssd_jax.importers.llamagen --gpt=c2i_B_256.pt --vq=vq_ds16_c2i.pt \
      --image_size=256 --out=runs/llamagen_b256

writes `OUT/ar/` (and `OUT/tokenizer/` with --vq), each with model.json and an Orbax
checkpoint as our training writes them, so sample.py, bench.py and train.py read it like
our own. Sizes come from the tensor shapes; the number of heads from LlamaGen's table by
width (or --num_heads). Every key must be used and every shape must fit: LlamaGen's own
sampler loads with strict=False, where a misnamed key silently keeps its random init.
"""

import argparse
import os
import re
import sys

import jax
import numpy as np

from ssd_jax import pretrained
from ssd_jax.importers import state_dict
from ssd_jax.importers.state_dict import ImportRefused
from ssd_jax.training import checkpoint

DOWNSAMPLE = 16  # VQ-16: one token per 16x16 pixels
HEADS_BY_WIDTH = {768: 12, 1024: 16, 1280: 20, 1536: 24, 2048: 32, 2560: 40, 3200: 32,
                  4096: 32}  # GPT-B, L, XL, XXL, 1B, XXXL, 3B, 7B (autoregressive/models/gpt.py)

# Our parameter path -> LlamaGen's key; 'T' marks torch Linear weights ([out, in]).
GPT_KEYS = [
    (r'token_embed/embedding', 'tok_embeddings.weight', ''),
    (r'class_embed/embedding', 'cls_embedding.embedding_table.weight', ''),
    (r'block_(\d+)/attn/qkv/kernel', r'layers.\1.attention.wqkv.weight', 'T'),
    (r'block_(\d+)/attn/out/kernel', r'layers.\1.attention.wo.weight', 'T'),
    (r'block_(\d+)/attn_norm/scale', r'layers.\1.attention_norm.weight', ''),
    (r'block_(\d+)/mlp/gate/kernel', r'layers.\1.feed_forward.w1.weight', 'T'),
    (r'block_(\d+)/mlp/up/kernel', r'layers.\1.feed_forward.w3.weight', 'T'),
    (r'block_(\d+)/mlp/down/kernel', r'layers.\1.feed_forward.w2.weight', 'T'),
    (r'block_(\d+)/mlp_norm/scale', r'layers.\1.ffn_norm.weight', ''),
    (r'final_norm/scale', 'norm.weight', ''),
    (r'lm_head/kernel', 'output.weight', 'T'),
]
GPT_IGNORED = ('freqs_cis',)  # a derived RoPE table that some versions saved
VQ_IGNORED = ('quantize.codebook_used',)  # a training-time usage buffer


def _layer_count(state, pattern):
  found = [int(m.group(1)) for k in state for m in [re.fullmatch(pattern, k)] if m]
  return max(found) + 1 if found else 0


def _need(state, key, where):
  if key not in state:
    raise ImportRefused(f'{where}: key {key!r} missing; is this a LlamaGen checkpoint?')
  return state[key].shape


def gpt_spec(state, image_size, num_heads=None, where='--gpt'):
  """model.json's 'transformer' entry, from the shapes in LlamaGen's GPT state dict."""
  vocab, dim = _need(state, 'tok_embeddings.weight', where)
  classes = _need(state, 'cls_embedding.embedding_table.weight', where)[0] - 1  # + the null
  mlp_dim = _need(state, 'layers.0.feed_forward.w1.weight', where)[0]
  if num_heads is None:
    if dim not in HEADS_BY_WIDTH:
      raise ImportRefused(f'{where}: width {dim} is none of LlamaGen\'s models '
                          f'({sorted(HEADS_BY_WIDTH)}); pass --num_heads.')
    num_heads = HEADS_BY_WIDTH[dim]
  if dim % num_heads or (dim // num_heads) % 4:
    raise ImportRefused(f'{where}: width {dim} with {num_heads} heads gives head dim '
                        f'{dim / num_heads:g}; 2D RoPE needs a multiple of 4.')
  if image_size % DOWNSAMPLE:
    raise ImportRefused(f'--image_size={image_size} is not a multiple of {DOWNSAMPLE}.')
  grid = image_size // DOWNSAMPLE
  return dict(vocab_size=int(vocab), num_classes=int(classes), grid=[grid, grid],
              num_layers=_layer_count(state, r'layers\.(\d+)\.attention\.wqkv\.weight'),
              dim=int(dim), num_heads=int(num_heads), mlp_dim=int(mlp_dim), prefix_len=1,
              rope_base=10000.0, label_dropout=0.1, norm_eps=1e-5, rope_interleaved=True,
              rope_zero_prefix=True)


def vq_spec(state, where='--vq'):
  """model.json's 'tokenizer' entry (kind vq16), from LlamaGen's VQ state dict."""
  codebook_size, code_dim = _need(state, 'quantize.embedding.weight', where)
  channels, image_channels = _need(state, 'encoder.conv_in.weight', where)[:2]
  levels = _layer_count(state, r'encoder\.conv_blocks\.(\d+)\.res\.0\.conv1\.weight')
  mult = [int(state[f'encoder.conv_blocks.{i}.res.0.conv1.weight'].shape[0] // channels)
          for i in range(levels)]
  res_blocks = _layer_count(state, r'encoder\.conv_blocks\.0\.res\.(\d+)\.conv1\.weight')
  return dict(kind='vq16', codebook_size=int(codebook_size), code_dim=int(code_dim),
              channels=int(channels), channel_mult=mult, image_channels=int(image_channels),
              num_res_blocks=res_blocks,
              z_channels=int(_need(state, 'encoder.conv_out.weight', where)[0]))


def gpt_key(path):
  for pattern, key, transform in GPT_KEYS:
    if re.fullmatch(pattern, path):
      return re.sub(pattern, key, path), transform
  raise AssertionError(f'no LlamaGen key for parameter {path}')


def vq_key(path):
  """encoder/conv_blocks_2/res_1/conv1/kernel -> encoder.conv_blocks.2.res.1.conv1.weight."""
  if path == 'codebook':
    return 'quantize.embedding.weight', ''
  *parts, leaf = [re.sub(r'_(\d+)$', r'.\1', p) for p in path.split('/')]
  return '.'.join(parts + ['bias' if leaf == 'bias' else 'weight']), (
      'conv' if leaf == 'kernel' else '')


def torch_shape(shape, transform):
  if transform == 'T':
    return tuple(reversed(shape))
  if transform == 'conv':  # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(shape)


def from_torch(array, transform):
  if transform == 'T':
    return np.ascontiguousarray(array.T)
  if transform == 'conv':  # OIHW -> HWIO
    return np.ascontiguousarray(array.transpose(2, 3, 1, 0))
  return array


def key_map(stage, module, key_fn):
  """(abstract params, {our path: (LlamaGen key, transform)}, {LlamaGen key: torch shape})."""
  abstract = pretrained.abstract_params(module, None, pretrained.init_args(stage, module))
  leaves = {'/'.join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(abstract)}
  keys = {path: key_fn(path) for path in leaves}
  shapes = {key: torch_shape(leaves[path].shape, t) for path, (key, t) in keys.items()}
  return abstract, keys, shapes


def convert(state, stage, module, key_fn, ignored, where):
  """LlamaGen state dict -> our params tree for `module`, every key checked. Consumes `state`
  (each tensor is dropped once converted: peak memory stays near one copy of the model)."""
  abstract, keys, shapes = key_map(stage, module, key_fn)
  state_dict.check_keys(state, shapes, where, ignored)
  flat = {path: from_torch(state.pop(key), t) for path, (key, t) in keys.items()}
  return jax.tree_util.tree_map_with_path(
      lambda path, _: flat['/'.join(k.key for k in path)], abstract)


def check_fresh(stage_dir):
  if checkpoint.StageCheckpoints(stage_dir).exists():
    raise ImportRefused(f'{stage_dir} already holds a checkpoint; choose a fresh --out.')


def write_stage(stage_dir, spec, params):
  """model.json + an Orbax checkpoint at step 0, as a training run leaves them."""
  ckpts = checkpoint.StageCheckpoints(stage_dir)
  ckpts.save(0, params)
  ckpts.wait()
  checkpoint.save_json(os.path.join(stage_dir, 'model.json'), spec)


def import_files(gpt, out, image_size, vq=None, num_heads=None, weights='ema',
                 trust_pickle=False):
  """Writes OUT/ar (and OUT/tokenizer); returns {stage: spec} of what it wrote."""
  for stage in ('ar', 'tokenizer') if vq else ('ar',):
    check_fresh(os.path.join(out, stage))
  jobs = []  # everything is read and checked before anything is written
  state = state_dict.read(gpt, weights, trust_pickle)
  spec = {'transformer': gpt_spec(state, image_size, num_heads, where=gpt)}
  module = pretrained.MODULES['ar'](spec)
  jobs.append(('ar', spec, convert(state, 'ar', module, gpt_key, GPT_IGNORED, gpt)))
  if vq is not None:
    state = state_dict.read(vq, weights, trust_pickle)
    vq_entry = vq_spec(state, where=vq)
    if vq_entry['codebook_size'] != spec['transformer']['vocab_size']:
      raise ImportRefused(f'{vq} has {vq_entry["codebook_size"]} codes but {gpt} a vocabulary '
                          f'of {spec["transformer"]["vocab_size"]}; they do not belong together.')
    tok_spec = {'tokenizer': vq_entry}
    module = pretrained.MODULES['tokenizer'](tok_spec)
    jobs.append(('tokenizer', tok_spec,
                 convert(state, 'tokenizer', module, vq_key, VQ_IGNORED, vq)))
  for stage, stage_spec, params in jobs:
    write_stage(os.path.join(out, stage), stage_spec, params)
  return {stage: stage_spec for stage, stage_spec, _ in jobs}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--gpt', required=True, help='LlamaGen c2i GPT (.pt or .safetensors)')
  parser.add_argument('--vq', help='LlamaGen VQ-16 tokenizer (.pt or .safetensors)')
  parser.add_argument('--image_size', type=int, required=True,
                      help='what the GPT was trained at: 256 (16x16 tokens) or 384 (24x24)')
  parser.add_argument('--num_heads', type=int, help='default: LlamaGen\'s, by width')
  parser.add_argument('--weights', choices=('ema', 'model'), default='ema',
                      help='which weights of a training checkpoint (ema when present)')
  parser.add_argument('--trust_pickle', action='store_true',
                      help='unpickle .pt files that hold more than tensors (runs their code)')
  parser.add_argument('--out', required=True, help='run folder to write')
  args = parser.parse_args(argv)
  try:
    written = import_files(args.gpt, args.out, args.image_size, args.vq, args.num_heads,
                           args.weights, args.trust_pickle)
  except ImportRefused as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  t = written['ar']['transformer']
  print(f'{args.out}/ar: {t["num_layers"]} layers, width {t["dim"]}, {t["num_heads"]} heads, '
        f'{t["grid"][0]}x{t["grid"][1]} tokens, {t["num_classes"]} classes')
  if 'tokenizer' not in written:
    print('no --vq: sampling writes tokens only (--tokens_out); images need the tokenizer.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
