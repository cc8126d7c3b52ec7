"""Stage `mulo_draft` for an imported LlamaGen GPT-B (256x256, 16x16 tokens), ImageNet from tfds.

  python -m ssd_jax.importers.llamagen --gpt=c2i_B_256.pt --vq=vq_ds16_c2i.pt \
      --image_size=256 --out=runs/llamagen_b256
  python train.py --config=configs/llamagen/mulo_draft_b256.py --workdir=runs/llamagen_b256 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, array_record
  python train.py --config=configs/llamagen/mulo_upsampler_b256.py --workdir=runs/llamagen_b256 \
      --config.data.data_dir=/path/to/tensorflow_datasets
  python sample.py --checkpoint=runs/llamagen_b256 --method=mulo --compare_ar

A class-conditional AR drafter on 8x8 grids: the imported VQ-16's 16x16 token grids pooled
2x2 to the nearest code (neither stage needs the GPT). The data path is
configs/llamagen/heads_b256.py's: ImageNet tokenized once with the imported VQ-16 into
<workdir>/tokens/imagenet2012/ (shared with the heads and hawk runs on the same workdir),
then tokens only; the VQ-16 itself stays on every device (pooling needs its codebook, the
evaluation its decoder). Data parallel, batch_size divisible by the devices. No sample grid
(samples_per_class = 0: one row per class would be 1000 rows). Memory not measured; not run
here on real weights.
"""

from configs import mulo_draft
from configs.llamagen import common


def imagenet_data(config, arg, variant):
  """ImageNet through the token cache at 256x256 for a MuLo-SD stage (8x8 drafts)."""
  config = common.imagenet(config, arg, variant)
  config.data.num_classes = 1000  # ImageNet's classes (the null class 1000 for CFG).
  config.factor = 2  # 16x16 tokens -> 8x8 drafts.
  return config


def get_config(arg=None):
  config = imagenet_data(mulo_draft.get_config(), arg, 'configs/llamagen/mulo_draft_b256.py')
  config.samples_per_class = 0  # No sample grid (1000 classes).
  config.model.num_layers = 6  # Transformer blocks: a 64-token drafter, far below GPT-B.
  config.model.dim = 384  # Model width (GPT-B: 768).
  config.model.num_heads = 6  # Head dim 64.
  config.model.mlp_dim = 1024  # SwiGLU hidden width.
  return config
