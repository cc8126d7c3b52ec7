"""Meshes and logical-axis sharding.

Model code names logical axes only ('embed', 'heads', 'act_batch', ...); the config's
`mesh.rules` maps them to the mesh axes 'data' and 'model'. Everything that places arrays
goes through this file, so a single-device run and a pod run execute the same code.
"""

import jax
import flax.linen as nn
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ('data', 'model')

# Logical axis -> mesh axis. Parameters are split over 'model' (heads, MLP, vocabulary);
# activations over 'data' on their batch axis.
DEFAULT_RULES = (
    ('act_batch', 'data'),
    ('act_len', None),
    ('act_embed', None),
    ('act_heads', 'model'),
    ('act_vocab', 'model'),
    ('embed', None),
    ('heads', 'model'),
    ('kv', None),
    ('mlp', 'model'),
    ('vocab', 'model'),
    ('classes', None),
    ('embed_out', None),
)


def mesh_shape(data, model, num_devices=None):
  """Resolves -1 ("the remaining devices") and checks the product against the devices."""
  n = jax.device_count() if num_devices is None else num_devices
  if data == -1 and model == -1:
    raise ValueError('At most one of mesh data/model may be -1.')
  if data == -1:
    data = n // model if model > 0 and n % model == 0 else 0
  if model == -1:
    model = n // data if data > 0 and n % data == 0 else 0
  if data <= 0 or model <= 0 or data * model != n:
    raise ValueError(f'A mesh of data={data} x model={model} does not fit the {n} devices; '
                     f'choose sizes whose product is {n} (or -1 for one of them).')
  return data, model


def make_mesh(data=-1, model=1, devices=None):
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(data, model, len(devices))
  # Auto axes: we place arrays with jit shardings and with_sharding_constraint.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def mesh_from_config(config):
  return make_mesh(config.mesh.data, config.mesh.model)


def rules_from_config(config):
  return tuple((k, v) for k, v in config.mesh.rules) if config.mesh.get('rules') else (
      DEFAULT_RULES)


def logical_shardings(abstract_boxed, mesh, rules):
  """NamedShardings for a tree of (possibly LogicallyPartitioned) abstract leaves."""
  specs = nn.get_partition_spec(abstract_boxed)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def replicated(mesh):
  return NamedSharding(mesh, P())


def batch_sharding(mesh, ndim=1):
  return NamedSharding(mesh, P('data', *([None] * (ndim - 1))))


def check_divisible(batch_size, mesh, what='batch_size'):
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(f'{what}={batch_size} is not divisible by the {data} data devices of '
                     f'the mesh; use a multiple of {data}.')


def global_batch(local, mesh):
  """Assembles a global array sharded on 'data' from this process's numpy batch."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local)


def strip_boxes(tree):
  """Removes LogicallyPartitioned boxes (keeps the values; unlike nn.meta.unbox it adds no
  sharding constraint, so it also works on abstract trees outside jit)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(
      x, nn.meta.AxisMetadata) else x, tree, is_leaf=lambda x: isinstance(
          x, nn.meta.AxisMetadata))
