"""Stage `mulo_upsampler` for an imported LlamaGen GPT-B (256x256): 8x8 pooled -> 16x16 tokens.

  python train.py --config=configs/llamagen/mulo_upsampler_b256.py --workdir=runs/llamagen_b256 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, array_record

As configs/llamagen/mulo_draft_b256.py (the same token cache, data path and mesh; the
imported VQ-16 on every device): a non-causal transformer that learns p(16x16 grid | 8x8
pooled grid, class). results.json reports PSNR against the VQ-16's own reconstruction
(psnr_upsampled_vs_reconstruction), since cached tokens carry no images. Memory not
measured; not run here on real weights.
"""

from configs import mulo_upsampler
from configs.llamagen import mulo_draft_b256


def get_config(arg=None):
  config = mulo_draft_b256.imagenet_data(mulo_upsampler.get_config(), arg,
                                         'configs/llamagen/mulo_upsampler_b256.py')
  config.model.num_layers = 4  # Non-causal transformer blocks.
  config.model.dim = 384  # Model width (GPT-B: 768).
  config.model.num_heads = 6  # Head dim 64.
  config.model.mlp_dim = 1024  # SwiGLU hidden width.
  return config
