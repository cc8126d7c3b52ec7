"""Reading other projects' PyTorch state dicts (.pt pickles or .safetensors) as numpy, safely.

A .pt file is a pickle, and unpickling runs code: it is read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers. A file
that needs more (training checkpoints that pickle their argparse `args`) is refused unless
the caller trusts it. .safetensors files hold nothing but tensors and need no torch.
"""

import os
import pickle

import numpy as np

TORCH_SUFFIXES = ('.pt', '.pth', '.bin', '.ckpt')
WRAPPERS = ('ema', 'model', 'module', 'state_dict')  # where training scripts put the weights


class ImportRefused(ValueError):
  """A checkpoint file that cannot be imported as it is; the message says why and what to do."""


def read(path, weights='ema', trust_pickle=False):
  """{key: float32 array} of the state dict in `path`.

  Training checkpoints wrap it ({"model": ..., "ema": ..., "optimizer": ...}): `weights`
  names the entry to use; 'ema' falls back to 'model' when the file has no EMA weights.
  """
  if not os.path.isfile(path):
    raise ImportRefused(f'{path}: no such file.')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  if not path.endswith(TORCH_SUFFIXES):
    raise ImportRefused(f'{path}: unknown file type; expected .safetensors or a PyTorch file '
                        f'({", ".join(TORCH_SUFFIXES)}).')
  obj = _torch_load(path, trust_pickle)
  return {k: _to_numpy(v) for k, v in _unwrap(obj, path, weights).items()}


def _read_safetensors(path):
  try:
    import ml_dtypes  # pylint: disable=import-outside-toplevel,unused-import
    # (ml_dtypes, which jax needs anyway, teaches numpy 'bfloat16': bf16 files then load.)
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportRefused('reading .safetensors needs the `safetensors` package '
                        '(pip install -r requirements.txt).') from e
  try:
    return {k: np.asarray(v, np.float32) for k, v in load_file(path).items()}
  except Exception as e:  # pylint: disable=broad-except
    raise ImportRefused(f'{path}: not a readable .safetensors file ({e}).') from e


def _torch_load(path, trust_pickle):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportRefused(f'{path} is a PyTorch pickle and reading it needs torch, which is '
                        'optional here: `pip install torch` (a CPU build is enough), or convert '
                        'the file to .safetensors elsewhere.') from e
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    if not trust_pickle:
      raise ImportRefused(
          f'{path} holds Python objects besides tensors (training checkpoints pickle their '
          'argparse args), and loading them runs code the file names. Pass --trust_pickle '
          'only for a file from a source you trust, or re-save just its weights '
          '(e.g. as .safetensors).') from e
  except Exception as e:  # pylint: disable=broad-except
    raise ImportRefused(f'{path}: not a readable PyTorch file ({type(e).__name__}: '
                        f'{str(e)[:200]}).') from e
  return torch.load(path, map_location='cpu', weights_only=False)


def _unwrap(obj, path, weights):
  if not isinstance(obj, dict):
    raise ImportRefused(f'{path} holds a {type(obj).__name__}, not a state dict.')
  present = [k for k in WRAPPERS if isinstance(obj.get(k), dict)]
  if not present:
    return obj  # a raw state dict (LlamaGen's FSDP checkpoints)
  if weights in present:
    return obj[weights]
  if weights == 'ema':  # EMA weights are preferred, not required
    print(f'{path} has no "ema" weights; importing {present[0]!r}.')
    return obj[present[0]]
  raise ImportRefused(f'{path} has no {weights!r} weights (it has {", ".join(present)}); '
                      'choose one with --weights.')


def _to_numpy(tensor):
  if not hasattr(tensor, 'detach'):
    raise ImportRefused(f'state-dict entry of type {type(tensor).__name__} is not a tensor.')
  return tensor.detach().float().cpu().numpy()  # bf16 / fp16 -> float32


def check_keys(state, expected, where, ignored=()):
  """Refuses missing, unexpected or mis-shaped keys by name; expected {key: shape}."""
  names = lambda keys: ', '.join(sorted(keys)[:5]) + (' ...' if len(keys) > 5 else '')
  missing = set(expected) - set(state)
  if missing:
    raise ImportRefused(f'{where}: {len(missing)} key(s) missing: {names(missing)}.')
  unexpected = set(state) - set(expected) - set(ignored)
  if unexpected:
    raise ImportRefused(f'{where}: {len(unexpected)} unexpected key(s): {names(unexpected)}.')
  wrong = [f'{k} has {tuple(state[k].shape)}, expected {tuple(expected[k])}'
           for k in sorted(expected) if tuple(state[k].shape) != tuple(expected[k])]
  if wrong:
    raise ImportRefused(f'{where}: {len(wrong)} key(s) of the wrong shape: '
                        + '; '.join(wrong[:3]) + (' ...' if len(wrong) > 3 else '') + '.')
