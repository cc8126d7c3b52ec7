"""PNG grids of images (uint8), upscaled with nearest neighbours so small images are legible."""

import os

import jax
import numpy as np
from PIL import Image


def grid(images, ncols, pad=2, pad_value=255):
  """images [N, H, W, C] uint8 -> one [rows*(H+pad)-pad, ...] array, row-major."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  nrows = -(-n // ncols)
  out = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), pad_value, np.uint8)
  for i in range(n):
    r, col = divmod(i, ncols)
    out[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = images[i]
  return out


def save_png(path, image, scale=1):
  """Writes one [H, W, C] uint8 image; C is 1 (grey) or 3 (RGB). Only process 0 writes:
  with several processes every one computes the same images."""
  if jax.process_index() != 0:
    return
  image = np.asarray(image)
  if scale > 1:
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  if image.shape[-1] == 1:
    image = image[..., 0]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray(image).save(path)


def save_grid(path, images, ncols, scale=2):
  save_png(path, grid(images, ncols), scale=scale)
