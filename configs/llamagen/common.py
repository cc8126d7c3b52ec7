"""What every stage config on an imported LlamaGen GPT shares: ImageNet from tfds through
the token cache, data parallel, and the :smoke variant."""


def imagenet(config, arg, variant, image_size=256, batch_size=256):
  """Sets `config` (a stage's own config) to train on ImageNet at `image_size`."""
  config.data.name = 'imagenet2012'  # tfds name, prepared on disk (array_record).
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = image_size  # The GPT's training size (VQ-16 grid = size / 16).
  config.data.channels = 3
  config.data.pretokenize = True  # VQ-16 once into <workdir>/tokens, then tokens only.
  config.data.tokenize_batch = 128  # Images per VQ-16 call per process while tokenizing.
  config.batch_size = batch_size
  config.num_steps = 20000  # Global batches; 20000 x 256 is 4 epochs of ImageNet.
  config.learning_rate = 1e-3
  config.warmup_steps = 1000
  config.log_every = 100
  config.checkpoint_every = 2000
  config.eval_examples = 10000  # First validation images: tokenized once, then evaluated.
  config.mesh.data = -1  # All devices on the data axis (the frozen backbone is replicated).
  config.mesh.model = 1
  if arg == 'smoke':  # The same path on slices of the splits: minutes on one accelerator.
    config.data.train_split = 'train[:256]'
    config.data.eval_split = 'validation[:32]'
    config.data.tokenize_batch = 8
    config.batch_size = 8
    config.num_steps = 4
    config.warmup_steps = 1
    config.log_every = 2
    config.checkpoint_every = 4
    config.eval_examples = 32
  elif arg:
    raise ValueError(f'unknown config variant {arg!r}; use {variant}[:smoke]')
  return config
