"""What a stage on a frozen backbone trains on: token grids of a tfds image split.

Either the frozen tokenizer encodes each batch's images inside the step (our own small
models: Fashion-MNIST, 28x28), or, with --config.data.pretokenize, the split is tokenized
once into a cache on disk (ssd_jax/data/tokens.py) and batches carry the tokens
(imported LlamaGen models: ImageNet-style images of any size, a VQ-16 encoder far costlier
than the heads). Both give the loss the same [B, H*W] grids.
"""

import os

from ssd_jax.data import pipeline
from ssd_jax.data import tokens as tokens_lib
from ssd_jax.training import ar_stage


class StageInputs:
  """Training source, held-out data and per-batch token grids for one stage."""

  def __init__(self, config, workdir, tokenizer, tok_spec, tok_params, model, log=print):
    self.config = config
    self.encode = ar_stage.encode_fn(tokenizer)
    self.cache = None
    data = config.data
    if not data.get('pretokenize', False):
      return
    size = tuple(g * tokenizer.factor for g in model.grid)
    if data.image_size != size[0] or size[0] != size[1]:
      raise ValueError(
          f'--config.data.image_size={data.image_size} does not fit the backbone: its '
          f'{model.grid[0]}x{model.grid[1]} grid through the tokenizer (factor '
          f'{tokenizer.factor}) needs {size[0]}x{size[1]} images; set '
          f'--config.data.image_size={size[0]}.')
    self.num_classes = model.num_classes
    self.cache = tokens_lib.TokenCache(
        data, data.tokens_dir or os.path.join(workdir, 'tokens'), tokenizer, tok_params,
        tok_spec['tokenizer'], model.grid, batch_size=data.tokenize_batch,
        chunk_size=data.tokens_chunk, log=log)

  def train_source(self):
    """The training split's source; with pretokenize, tokenizes what the cache lacks of it
    and of the held-out examples first (once, before anything compiles)."""
    if self.cache is None:
      return pipeline.data_source(self.config.data, self.config.data.train_split)
    self.cache.source(self.config.data.eval_split, self.config.eval_examples)
    source = self.cache.source(self.config.data.train_split)
    top = int(source.labels.max()) if len(source) else -1
    if top >= self.num_classes:
      raise ValueError(
          f'{self.cache.split_dir(self.config.data.train_split)} has label {top}, but the '
          f'backbone knows {self.num_classes} classes; use a dataset with its classes.')
    return source

  def eval_data(self):
    """The first eval_examples held-out examples: {'image' or 'tokens', 'label'}."""
    if self.cache is None:
      return pipeline.load_arrays(self.config.data, self.config.data.eval_split,
                                  self.config.eval_examples)
    return self.cache.source(self.config.data.eval_split, self.config.eval_examples).arrays()

  def grids(self, tok_params, batch):
    """[B, H*W] int32 token grids of a batch (traced inside the step)."""
    if 'tokens' in batch:
      return batch['tokens'].reshape(batch['tokens'].shape[0], -1)
    return self.encode(tok_params, batch['image'])
