"""Process start-up shared by the scripts: multi-host init and JAX flags."""

import os

import jax


def multi_process_env():
  """True when the environment describes more than one JAX process."""
  if os.environ.get('JAX_COORDINATOR_ADDRESS') and int(
      os.environ.get('JAX_NUM_PROCESSES', '1')) > 1:
    return True
  # Cluster launchers jax.distributed detects by itself (SLURM, Open MPI, TPU pods).
  return int(os.environ.get('SLURM_NTASKS', '1')) > 1 or int(
      os.environ.get('OMPI_COMM_WORLD_SIZE', '1')) > 1 or bool(
          os.environ.get('TPU_WORKER_HOSTNAMES', '').count(','))


def setup():
  # Random numbers must not depend on how arrays are sharded.
  jax.config.update('jax_threefry_partitionable', True)
  if multi_process_env() and not jax.distributed.is_initialized():
    if os.environ.get('JAX_COORDINATOR_ADDRESS'):
      jax.distributed.initialize(
          coordinator_address=os.environ['JAX_COORDINATOR_ADDRESS'],
          num_processes=int(os.environ['JAX_NUM_PROCESSES']),
          process_id=int(os.environ['JAX_PROCESS_ID']))
    else:
      jax.distributed.initialize()


def quiet_logs():
  """Orbax and tfds log every file they touch at INFO; keep the console for progress."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
