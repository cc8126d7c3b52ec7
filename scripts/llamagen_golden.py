"""Golden files for tests/test_llamagen.py, made by LlamaGen's own PyTorch code (not in CI).

  pip install torch==2.13.0 safetensors   # a CPU build; torch stays out of requirements.txt
  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/llamagen_golden.py \
      --llamagen=/path/to/LlamaGen --out=tests/golden/llamagen

Builds a tiny random c2i GPT and a tiny VQ (LlamaGen's classes, small sizes), rounds their
weights to float16 (so the committed files are small and both sides see the same numbers)
and writes:
  gpt.safetensors, vq.safetensors   the weights, with LlamaGen's key names;
  gpt.npz   teacher-forced logits (eval mode, no dropout) and greedy CFG tokens;
  vq.npz    the decode of a token grid and the encode of an image;
  keys.json LlamaGen's key -> shape of GPT-B and GPT-3B (2 layers) and VQ-16 at their real
            widths, so the importer's key map is pinned for the real sizes too.
Weights are drawn so logits are peaked: greedy decoding is then stable across matmul orders.
"""

import argparse
import json
import os
import sys

import numpy as np
import torch

IMAGE_SIZE = 80  # 5x5 tokens at LlamaGen's fixed downsampling of 16
GPT_ARGS = dict(dim=32, n_layer=2, n_head=2, multiple_of=32, vocab_size=64, num_classes=10,
                block_size=25, cls_token_num=1, class_dropout_prob=0.1, token_dropout_p=0.0,
                resid_dropout_p=0.0, ffn_dropout_p=0.0, model_type='c2i')
# GroupNorm(32) needs 32 channels; one width keeps the files small (nin_shortcut, used where
# widths change, is pinned by keys.json and is the same 1x1 conv as q, k, v).
VQ_SIZES = dict(ch=32, ch_mult=(1, 1, 1), num_res_blocks=1, z_channels=32)
CFG_SCALE, CFG_INTERVAL = 2.0, 3


def randomize(model, gen, linear_std=None, embed_std=1.0):
  """Random weights (LlamaGen zeroes `output` at init), rounded to float16; linear and conv
  weights have std `linear_std`, or 1.5 / sqrt(fan in) when None."""
  for name, p in model.named_parameters():
    if 'norm' in name.split('.')[-2] and name.endswith('weight'):  # RMSNorm / GroupNorm scales
      w = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
    elif 'embedding' in name:
      w = embed_std * torch.randn(p.shape, generator=gen)
    elif name.endswith('bias'):
      w = 0.05 * torch.randn(p.shape, generator=gen)
    else:
      fan_in = int(np.prod(p.shape[1:]))
      w = torch.randn(p.shape, generator=gen) * (linear_std or 1.5 / fan_in ** 0.5)
    with torch.no_grad():
      p.copy_(w.half().float())


def save_weights(model, path, skip=()):
  from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
  state = {k: v.half().contiguous() for k, v in model.state_dict().items() if k not in skip}
  save_file(state, path)


def greedy_margin(gpt_lib, state, cond, tokens, scale):
  """Smallest gap between the best and second-best guided logit along a greedy path."""
  model = gpt_lib.Transformer(gpt_lib.ModelArgs(**GPT_ARGS)).eval()
  model.load_state_dict(state)
  n = tokens.shape[1]
  labels = torch.cat([cond, torch.full_like(cond, GPT_ARGS['num_classes'])])
  both = torch.cat([tokens, tokens]).long()
  logits, _ = model(idx=both[:, :-1], cond_idx=labels, input_pos=torch.arange(n))
  c, u = logits.chunk(2)
  guided = u + (c - u) * scale if scale > 1 else c
  top2 = torch.topk(guided, 2, dim=-1).values
  return (top2[..., 0] - top2[..., 1]).min().item()


def gpt_goldens(gpt_lib, generate_lib, gen, out):
  model = gpt_lib.Transformer(gpt_lib.ModelArgs(**GPT_ARGS)).eval()
  # Large weights for a tiny model: varied greedy paths with clear winners (peaked logits).
  randomize(model, gen, linear_std=0.5)
  state = {k: v.clone() for k, v in model.state_dict().items()}  # before any KV cache
  save_weights(model, os.path.join(out, 'gpt.safetensors'))
  n = GPT_ARGS['block_size']
  tokens = torch.randint(0, GPT_ARGS['vocab_size'], (3, n), generator=gen)
  labels = torch.tensor([3, 7, GPT_ARGS['num_classes']])  # the last is the null class
  with torch.no_grad():  # eval mode: no label or token dropout; output 0 predicts token 0
    logits, _ = model(idx=tokens[:, :-1], cond_idx=labels, input_pos=torch.arange(n))
    cond = torch.tensor([1, 4])
    greedy = dict(temperature=1.0, top_k=0, top_p=1.0, sample_logits=False)
    runs = {'tokens_cfg': dict(cfg_scale=CFG_SCALE, cfg_interval=-1),
            'tokens_cfg_interval': dict(cfg_scale=CFG_SCALE, cfg_interval=CFG_INTERVAL),
            'tokens_cond': dict(cfg_scale=1.0, cfg_interval=-1)}
    sampled = {k: generate_lib.generate(model, cond, n, **kw, **greedy).numpy()
               for k, kw in runs.items()}
  top2 = torch.topk(logits, 2, dim=-1).values
  gap = (top2[..., 0] - top2[..., 1]).min()
  print(f'gpt: logits std {logits.std():.2f}, smallest teacher-forced top-2 gap {gap:.4f}')
  np.savez(os.path.join(out, 'gpt.npz'), tokens=tokens.numpy(), labels=labels.numpy(),
           logits=logits.numpy(), cond=cond.numpy(), image_size=IMAGE_SIZE,
           cfg_scale=CFG_SCALE, cfg_interval=CFG_INTERVAL, **sampled)
  margin = greedy_margin(gpt_lib, state, cond, torch.as_tensor(sampled['tokens_cfg']),
                         CFG_SCALE)
  assert margin > 1e-2, f'greedy CFG path has a near tie ({margin}); pick other weights'
  for k, v in sampled.items():
    print(f'{k}: {v[0, :12].tolist()} ...')
  print(f'smallest guided top-2 gap along the greedy CFG path: {margin:.4f}')


def vq_goldens(vq_lib, gen, out):
  sizes = dict(VQ_SIZES)
  model = vq_lib.VQModel(vq_lib.ModelArgs(
      codebook_size=GPT_ARGS['vocab_size'], codebook_embed_dim=8, z_channels=sizes['z_channels'],
      encoder_ch_mult=list(sizes['ch_mult']), decoder_ch_mult=list(sizes['ch_mult'])))
  model.encoder = vq_lib.Encoder(**sizes)  # LlamaGen's own classes at tiny sizes
  model.decoder = vq_lib.Decoder(**sizes)
  model.eval()
  randomize(model, gen)
  save_weights(model, os.path.join(out, 'vq.safetensors'), skip=('quantize.codebook_used',))
  f = 2 ** (len(sizes['ch_mult']) - 1)
  grid = torch.randint(0, GPT_ARGS['vocab_size'], (2, 3, 4), generator=gen)
  image = torch.rand((2, 3, 4 * f, 3 * f), generator=gen) * 2 - 1  # [B, C, H, W]
  with torch.no_grad():
    pixels = model.decode_code(grid, (2, 8, 3, 4))  # [B, 3, H, W]
    _, _, (_, _, codes) = model.encode(image)
    z = torch.nn.functional.normalize(model.quant_conv(model.encoder(image)), dim=1)
    e = torch.nn.functional.normalize(model.quantize.embedding.weight, dim=-1)
    dist = torch.topk(torch.cdist(z.permute(0, 2, 3, 1).reshape(-1, 8), e), 2, largest=False)
  margin = (dist.values[:, 1] - dist.values[:, 0]).min().item()
  assert margin > 1e-3, f'an encoded latent is nearly equidistant to two codes ({margin})'
  print(f'vq: factor {f}, {sum(p.numel() for p in model.parameters())} parameters, pixels std '
        f'{pixels.std():.3f}, smallest encode margin {margin:.4f}')
  np.savez(os.path.join(out, 'vq.npz'), grid=grid.numpy(),
           pixels=pixels.permute(0, 2, 3, 1).numpy(), image=image.permute(0, 2, 3, 1).numpy(),
           codes=codes.reshape(2, 4, 3).numpy())


def full_size_keys(gpt_lib, vq_lib):
  """Key shapes at the real widths; GPTs with 2 layers (every layer has the same keys, and
  the GPT's __init__ calls .item(), which meta tensors refuse, so it is built for real)."""
  shapes = lambda m: {k: list(v.shape) for k, v in m.state_dict().items()}
  widths = {'GPT-B': (768, 12), 'GPT-3B': (3200, 32)}  # gpt.py's GPT_B and GPT_3B
  keys = {name: shapes(gpt_lib.Transformer(gpt_lib.ModelArgs(
              dim=dim, n_head=heads, n_layer=2, vocab_size=16384, block_size=256)))
          for name, (dim, heads) in widths.items()}
  with torch.device('meta'):
    keys['VQ-16'] = shapes(vq_lib.VQ_16(codebook_size=16384, codebook_embed_dim=8))
  return keys


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--llamagen', required=True, help='a checkout of LlamaGen')
  parser.add_argument('--out', default='tests/golden/llamagen')
  args = parser.parse_args()
  sys.path.insert(0, os.path.abspath(args.llamagen))
  # pylint: disable=import-outside-toplevel
  from autoregressive.models import generate as generate_lib
  from autoregressive.models import gpt as gpt_lib
  from tokenizer.tokenizer_image import vq_model as vq_lib
  torch.set_grad_enabled(False)
  os.makedirs(args.out, exist_ok=True)
  gen = torch.Generator().manual_seed(0)
  gpt_goldens(gpt_lib, generate_lib, gen, args.out)
  vq_goldens(vq_lib, gen, args.out)
  with open(os.path.join(args.out, 'keys.json'), 'w') as f:
    json.dump(full_size_keys(gpt_lib, vq_lib), f, indent=0, sort_keys=True)
  print(f'wrote {sorted(os.listdir(args.out))} to {args.out}')


if __name__ == '__main__':
  main()
