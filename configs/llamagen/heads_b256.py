"""Stage `heads` on an imported LlamaGen GPT-B (256x256, 16x16 tokens), ImageNet from tfds.

  python -m ssd_jax.importers.llamagen --gpt=c2i_B_256.pt --vq=vq_ds16_c2i.pt \
      --image_size=256 --out=runs/llamagen_b256
  python train.py --config=configs/llamagen/heads_b256.py --workdir=runs/llamagen_b256 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, array_record
  python sample.py --checkpoint=runs/llamagen_b256 --method=speculative --compare_ar

The first run tokenizes ImageNet's train split (1.28M images, LlamaGen's centre crop) and
the first eval_examples of its validation split once with the imported VQ-16, into
<workdir>/tokens/imagenet2012/ (16x16 int32 per image: ~1.3 GB), every process its own
chunks (the folder must be on a filesystem they all see); reruns reuse it, and an
interrupted tokenization resumes at its first missing chunk. Training then reads only the
tokens. Mesh: data parallel (mesh.data=-1, mesh.model=1): the frozen backbone is replicated
on every device, the batch split over them; batch_size must divide by the devices.

Memory per device (XLA's buffer assignment of one training step on one device, compiled on a
CPU; a guide for accelerators, not a measurement on one): see docs/llamagen.md, section 5.
Not run here on real weights: no acceptance numbers yet.
"""

from configs import heads


def imagenet_heads(arg, variant, image_size, heads_mlp_dim, batch_size):
  """The heads config for an imported LlamaGen GPT trained at `image_size`."""
  config = heads.get_config()
  config.data.name = 'imagenet2012'  # tfds name, prepared on disk (array_record).
  config.data.train_split = 'train'
  config.data.eval_split = 'validation'
  config.data.image_size = image_size  # The GPT's training size (grid = image_size / 16).
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
  config.heads.mlp_dim = heads_mlp_dim  # Light heads: a third of the backbone's FFN width.
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


def get_config(arg=None):
  return imagenet_heads(arg, 'configs/llamagen/heads_b256.py', image_size=256,
                        heads_mlp_dim=1024, batch_size=256)
