"""Stage `heads` on an imported LlamaGen GPT-L (384x384, 24x24 tokens), ImageNet from tfds.

  python -m ssd_jax.importers.llamagen --gpt=c2i_L_384.pt --vq=vq_ds16_c2i.pt \
      --image_size=384 --out=runs/llamagen_l384
  python train.py --config=configs/llamagen/heads_l384.py --workdir=runs/llamagen_l384 \
      --config.data.data_dir=/path/to/tensorflow_datasets   # imagenet2012, array_record
  python sample.py --checkpoint=runs/llamagen_l384 --method=ssd --compare_ar

As configs/llamagen/heads_b256.py (tokens cached once under <workdir>/tokens/, 24x24 int32
per image: ~2.9 GB for ImageNet's train split; data parallel, the backbone replicated),
at 384x384 with GPT-L's width (1024) and a smaller global batch: a step is 2.25x the tokens
per image of GPT-B at 256 and ~3x its backbone. Memory per device: docs/llamagen.md,
section 5. Not run here on real weights: no acceptance numbers yet.
"""

from configs.llamagen import heads_b256


def get_config(arg=None):
  return heads_b256.imagenet_heads(arg, 'configs/llamagen/heads_l384.py', image_size=384,
                                   heads_mlp_dim=1536, batch_size=128)
