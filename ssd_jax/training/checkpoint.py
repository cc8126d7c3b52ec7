"""Orbax checkpoints of a stage: `<stage_dir>/checkpoints/<step>/{params,train}`.

`params` holds the model parameters; `train` the optimizer state, step and any extra
state. A released checkpoint keeps only `params` (the optimizer state would triple its
size); resuming from one restarts the optimizer. Restores always go against an abstract
target, after the saved shapes have been checked against it, so a checkpoint of another
model config is refused with the name of the first parameter that differs.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, or written for another config."""


def _path_str(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', getattr(k, 'name', k))))
                  for k in path)


def check_compatible(saved_tree, target_tree, where):
  """Raises CheckpointError naming the first leaf whose presence or shape differs."""
  saved = {_path_str(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(saved_tree)}
  target = {_path_str(p): leaf for p, leaf in
            jax.tree_util.tree_leaves_with_path(target_tree)}
  hint = ('It was written for another config: use the config saved beside it '
          '(config.json) or a fresh --workdir.')
  for name in sorted(target):
    if name not in saved:
      raise CheckpointError(f'{where}: parameter {name!r} is missing from the checkpoint. '
                            + hint)
    if tuple(saved[name].shape) != tuple(target[name].shape):
      raise CheckpointError(
          f'{where}: parameter {name!r} has shape {tuple(saved[name].shape)} in the '
          f'checkpoint but {tuple(target[name].shape)} in this config. ' + hint)
  extra = sorted(set(saved) - set(target))
  if extra:
    raise CheckpointError(f'{where}: the checkpoint has parameter {extra[0]!r}, which this '
                          'config does not make. ' + hint)


class StageCheckpoints:
  """Save / validate / restore for one stage directory."""

  def __init__(self, stage_dir, keep=3):
    self.stage_dir = os.path.abspath(stage_dir)
    self.directory = os.path.join(self.stage_dir, 'checkpoints')
    self._manager = None
    self._keep = keep

  @property
  def manager(self):
    if self._manager is None:
      # Naming the handlers lets a fresh manager read metadata of items it has not saved.
      self._manager = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(
              max_to_keep=self._keep, create=True),
          item_handlers={'params': ocp.StandardCheckpointHandler(),
                         'train': ocp.StandardCheckpointHandler()})
    return self._manager

  def exists(self):
    return os.path.isdir(self.directory) and any(
        name.isdigit() for name in os.listdir(self.directory))

  def latest_step(self):
    if not self.exists():
      return None
    try:
      return self.manager.latest_step()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'{self.directory} is not a readable checkpoint folder ({e}); '
                            'remove it or choose another --workdir.') from e

  def has_item(self, step, item):
    return os.path.isdir(os.path.join(self.directory, str(step), item))

  def save(self, step, params, train=None, force=False):
    items = {'params': ocp.args.StandardSave(params)}
    if train is not None:
      items['train'] = ocp.args.StandardSave(train)
    self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self):
    if self._manager is not None:
      self._manager.wait_until_finished()

  def _metadata(self, step, item):
    where = f'checkpoint {self.directory}/{step}/{item}'
    try:
      meta = self.manager.item_metadata(step)[item]
    except Exception as e:  # pylint: disable=broad-except
      # item_metadata reads every item of the step, so the broken one need not be `item`.
      raise CheckpointError(f'checkpoint {self.directory}/{step} cannot be read '
                            f'({type(e).__name__}: {e}); it is '
                            'corrupt or incomplete: delete that step folder to fall back '
                            'to an earlier one, or use a fresh --workdir.') from e
    if meta is None:
      raise CheckpointError(f'{where} has no metadata; it is corrupt or incomplete.')
    return getattr(meta, 'tree', meta), where

  def restore(self, step, abstract):
    """Restores {item: tree} for the items in `abstract` ({'params': ..., 'train': ...})."""
    for item, target in abstract.items():
      saved, where = self._metadata(step, item)
      check_compatible(saved, target, where)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(**{
          item: ocp.args.StandardRestore(target) for item, target in abstract.items()}))
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f'checkpoint {self.directory}/{step} could not be restored '
                            f'({type(e).__name__}: {str(e)[:300]}); it is corrupt: delete '
                            'that step folder or use a fresh --workdir.') from e
    return {item: restored[item] for item in abstract}


def save_json(path, obj):
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True, default=_json_default)
  os.replace(tmp, path)


def _json_default(x):
  if isinstance(x, (np.generic, np.ndarray)) or hasattr(x, 'tolist'):
    return np.asarray(x).tolist()
  return str(x)


def load_json(path):
  with open(path) as f:
    return json.load(f)
