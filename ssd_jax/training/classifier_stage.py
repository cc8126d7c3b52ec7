"""Stage `classifier`: the CNN whose features and predictions the benchmark measures with.

Trained on real images only (no earlier stage), so it judges every model of the same
dataset the same way. The evaluation reports test accuracy (the benchmark's class accuracy
is only meaningful if the judge itself is right on real images).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssd_jax.data import fashion_mnist
from ssd_jax.data import pipeline
from ssd_jax.models import classifier
from ssd_jax.training import loop


def classifier_spec(config):
  return dict(num_classes=config.data.num_classes, image_size=config.data.image_size,
              image_channels=config.data.channels, channels=list(config.model.channels),
              feature_dim=config.model.feature_dim, patch=config.model.patch)


def make_stage(config, workdir=None):
  del workdir  # Trained on images alone.
  spec = classifier_spec(config)
  if config.data.image_size % spec['patch']:
    raise ValueError(f'image_size={config.data.image_size} is not divisible by '
                     f'--config.model.patch={spec["patch"]}.')
  model = classifier.Classifier(**spec)
  shape = (1, config.data.image_size, config.data.image_size, config.data.channels)

  def init_params(key):
    return model.init(key, jnp.zeros(shape, jnp.uint8))['params']

  def loss_fn(params, frozen, batch, key, extra):
    del frozen, extra
    images = batch['image']
    if config.flip:  # Fashion-MNIST classes are mirror-symmetric; flips add free data.
      flip = jax.random.bernoulli(key, 0.5, images.shape[:1])[:, None, None, None]
      images = jnp.where(flip, images[:, :, ::-1], images)
    logits = model.apply({'params': params}, images)
    loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']))
    acc = jnp.mean(classifier.predict(logits) == batch['label'])
    return loss, ({'accuracy': acc}, None)

  def evaluate(params, frozen, stage_dir, mesh):
    del frozen, stage_dir, mesh
    data = pipeline.load_arrays(config.data, config.data.eval_split, config.eval_examples)
    return evaluate_classifier(model, params, data['image'], data['label'])

  names = (list(fashion_mnist.CLASS_NAMES) if config.data.name == 'fashion_mnist_local'
           else [])
  return loop.Stage(name='classifier', init_params=init_params, loss_fn=loss_fn,
                    evaluate=evaluate, spec={'classifier': spec, 'class_names': names})


def evaluate_classifier(model, params, images, labels, batch_size=500):
  """Accuracy overall and per class on held-out images."""
  predict = jax.jit(lambda x: classifier.predict(model.apply({'params': params}, x)))
  pred = np.concatenate([np.asarray(predict(images[i:i + batch_size]))
                         for i in range(0, len(images), batch_size)])
  labels = np.asarray(labels)
  per_class = {int(c): float(np.mean(pred[labels == c] == c)) for c in np.unique(labels)}
  return {'test_accuracy': float(np.mean(pred == labels)), 'per_class_accuracy': per_class,
          'num_images': int(len(labels))}
