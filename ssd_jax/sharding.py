"""Meshes and logical-axis sharding.

Model code names logical axes only ('embed', 'heads', 'act_batch', ...); the config's
`mesh.rules` maps them to the mesh axes 'data' and 'model'. Everything that places arrays
goes through this file, so a single-device run and a pod run execute the same code.
"""

import jax
from jax.experimental import multihost_utils
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


def check_heads_divisible(num_heads, mesh, rules, flag, what='the model'):
  """Raises a ValueError when the rules split attention heads over a number of devices of
  `mesh` that does not divide `num_heads`; `flag` names the option that sets the 'model'
  axis (--mesh_model for sampling, --config.mesh.model for training).

  check_params_divisible cannot see this: the qkv kernel's 'heads' axis is
  num_heads * head_dim * 3 wide, which a split through the heads may still divide.
  """
  devices = axis_devices(mesh, rules, 'heads')
  if num_heads % devices:
    divisors = [str(d) for d in range(1, num_heads + 1) if num_heads % d == 0]
    choices = ' or '.join([', '.join(divisors[:-1]), divisors[-1]] if len(divisors) > 1
                          else divisors)
    raise ValueError(
        f'{what} has {num_heads} attention heads, which the mesh splits over {devices} '
        f'devices: not divisible. Choose {flag} {choices}, or '
        "map 'heads' to None in the logical axis rules.")


def _mesh_axes(entry):  # one PartitionSpec entry -> tuple of mesh axis names
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _devices(mesh, axes):  # devices along a tuple of mesh axes
  return int(np.prod([mesh.shape[a] for a in axes]))


def axis_devices(mesh, rules, logical):
  """How many devices the rules split the logical axis `logical` over on `mesh`."""
  return _devices(mesh, _mesh_axes(nn.logical_to_mesh_axes((logical,), rules)[0]))


def _path_str(path):
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def check_params_divisible(abstract_boxed, mesh, rules, prefix='', fix=''):
  """Raises a ValueError naming the first parameter dimension the mesh cannot split evenly.

  jit would refuse such a layout only when compiling, with the mesh spec but not the
  logical axis; `fix` says which flag or config field to change.
  """
  def check(path, leaf):
    if not isinstance(leaf, nn.LogicallyPartitioned):
      return
    spec = nn.logical_to_mesh_axes(leaf.names, rules)
    for size, logical, entry in zip(leaf.value.shape, leaf.names, spec):
      axes = _mesh_axes(entry)
      devices = _devices(mesh, axes)
      if size % devices:
        raise ValueError(
            f'parameter {prefix + _path_str(path)!r} has {size} along its {logical!r} '
            f'axis, which the mesh splits over {"x".join(axes)!r} ({devices} devices); '
            f'{size} is not divisible by {devices}. {fix}'.rstrip())
  jax.tree_util.tree_map_with_path(check, abstract_boxed,
                                   is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def global_batch(local, mesh):
  """Assembles a global array sharded on 'data' from this process's numpy batch."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)
  return jax.tree.map(put, local)


def put(tree, shardings):
  """Places host-local values (the same on every process) by `shardings` (a tree or one).

  With several processes device_put reads an array already on a device as a cross-host
  transfer, which CPU and GPU backends refuse; from host memory it just copies.
  """
  if jax.process_count() > 1:
    tree = jax.tree.map(np.asarray, tree)
  return jax.device_put(tree, shardings)


def put_batch(x, mesh):
  """A host value (the same on every process) -> one global array split over 'data'.

  jit refuses host data for an input split over several processes, and device_put refuses
  PRNG key arrays there, so keys travel as their raw data.
  """
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    data = put_batch(jax.random.key_data(x), mesh)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  return put(x, batch_sharding(mesh, np.ndim(x)))


def to_host(x):
  """A global array as numpy on every process (gathered from the others where needed)."""
  if getattr(x, 'is_fully_addressable', True):
    return np.asarray(x)
  return multihost_utils.process_allgather(x, tiled=True)


def strip_boxes(tree):
  """Removes LogicallyPartitioned boxes (keeps the values; unlike nn.meta.unbox it adds no
  sharding constraint, so it also works on abstract trees outside jit)."""
  return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if isinstance(
      x, nn.meta.AxisMetadata) else x, tree, is_leaf=lambda x: isinstance(
          x, nn.meta.AxisMetadata))
