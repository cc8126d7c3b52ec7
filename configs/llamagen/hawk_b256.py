"""Stage `hawk_draft` on an imported LlamaGen GPT-B (256x256, 16x16 tokens), ImageNet from tfds.

  python -m ssd_jax.importers.llamagen --gpt=c2i_B_256.pt --vq=vq_ds16_c2i.pt \
      --image_size=256 --out=runs/llamagen_b256
  python train.py --config=configs/llamagen/hawk_b256.py --workdir=runs/llamagen_b256 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, array_record
  python sample.py --checkpoint=runs/llamagen_b256 --method=hawk --compare_ar

The data path is configs/llamagen/heads_b256.py's: ImageNet's train split and the first
eval_examples of its validation split are tokenized once with the imported VQ-16 (LlamaGen's
centre crop) into <workdir>/tokens/imagenet2012/ (~1.3 GB at 16x16), every process its own
chunks on a filesystem they all see; a heads run on the same workdir has made that cache
already, and this one reads it (a cache of another tokenizer, size or preprocessing is
refused). Mesh: data parallel (mesh.data=-1, mesh.model=1), the frozen backbone replicated,
batch_size divisible by the devices.

The drafter is half GPT-B's width (384, 6 heads of 64) with 2 window-attention layers over
the 2 rows above and 2 columns either side. Memory per device is not measured: its
temporaries are, like the heads', dominated by [batch, 256, 16384] float32 logits (here the
backbone's p and three draft modes, against the heads' five), so expect about the heads'
figures in docs/llamagen.md, section 5. Not run here on real weights: no acceptance numbers.
"""

from configs import hawk_draft
from configs.llamagen import common


def get_config(arg=None):
  config = common.imagenet(hawk_draft.get_config(), arg, 'configs/llamagen/hawk_b256.py')
  config.hawk.width = 384  # Half GPT-B's width (768).
  config.hawk.num_heads = 6  # Head dim 64, as the backbone's.
  config.hawk.mlp_dim = 1024  # SwiGLU width per layer.
  config.hawk.num_layers = 2  # Window-attention layers.
  config.hawk.rope_base = 100.0  # Axial 2D RoPE base: a 16x16 grid is still small.
  return config
