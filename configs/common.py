"""Fields shared by every stage's config (data, optimisation, checkpoints, mesh)."""

import ml_collections


def base(stage):
  config = ml_collections.ConfigDict()
  config.stage = stage  # Which train.py stage runs: tokenizer, ar, heads, ...
  config.seed = 0  # Seeds parameter init, data order and dropout.

  config.data = ml_collections.ConfigDict()
  config.data.name = 'fashion_mnist_local'  # tfds name; others must be prepared on disk.
  config.data.data_dir = ''  # tfds data_dir; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets.
  config.data.idx_dir = ''  # Fashion-MNIST IDX files; '' = Debian's package location.
  config.data.train_split = 'train'  # Split trained on.
  config.data.eval_split = 'test'  # Held-out split for the final evaluation.
  config.data.image_size = 28  # Height = width of the dataset's images.
  config.data.channels = 1  # Image channels (1 grey, 3 RGB).

  config.batch_size = 128  # Global batch, split over processes and 'data' devices.
  config.num_steps = 1000  # Total optimizer steps (resume continues up to this).
  config.learning_rate = 1e-3  # Peak AdamW learning rate.
  config.warmup_steps = 100  # Linear warm-up, then cosine decay to 10% of the peak.
  config.weight_decay = 0.0  # AdamW decoupled weight decay.
  config.grad_clip = 1.0  # Clip the global gradient norm to this.

  config.log_every = 50  # Console + metrics.jsonl line every this many steps.
  config.checkpoint_every = 500  # Save a checkpoint every this many steps (and at the end).
  config.keep_checkpoints = 3  # How many recent checkpoints to keep.
  config.eval_examples = 10000  # Held-out examples in the final evaluation.

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # Devices on the 'data' axis (-1: all the remaining ones).
  config.mesh.model = 1  # Devices on the 'model' axis (parameters split over it).
  config.mesh.rules = ()  # Logical->mesh axis rules; () = ssd_jax.sharding.DEFAULT_RULES.
  return config


def smoke(config, num_steps=4):
  """Shrinks the loop fields for a seconds-long CPU run."""
  config.batch_size = 8
  config.num_steps = num_steps
  config.warmup_steps = 1
  config.log_every = 2
  config.checkpoint_every = 2
  config.eval_examples = 32
  return config
