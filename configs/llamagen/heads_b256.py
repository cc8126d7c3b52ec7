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
from configs.llamagen import common


def imagenet_heads(arg, variant, image_size, heads_mlp_dim, batch_size):
  """The heads config for an imported LlamaGen GPT trained at `image_size`."""
  config = common.imagenet(heads.get_config(), arg, variant, image_size, batch_size)
  config.heads.mlp_dim = heads_mlp_dim  # Light heads: a third of the backbone's FFN width.
  return config


def get_config(arg=None):
  return imagenet_heads(arg, 'configs/llamagen/heads_b256.py', image_size=256,
                        heads_mlp_dim=1024, batch_size=256)
