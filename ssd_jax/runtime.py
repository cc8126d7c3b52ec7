"""Process start-up shared by the scripts: multi-host init and JAX flags.

Several JAX processes (one per host, or one per GPU) become one program through
`jax.distributed.initialize()`, called by `setup()` when the environment describes them:

- JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i (0..N-1)
  set by hand or by any launcher, the same address and N on every process;
- a Slurm job step (`srun`: SLURM_STEP_NUM_TASKS > 1) or an Open MPI `mpirun`
  (OMPI_COMM_WORLD_SIZE > 1), which jax.distributed detects by itself;
- a TPU slice on GKE (TPU_WORKER_HOSTNAMES lists several hosts). On Cloud TPU VMs the
  TPU runtime joins the hosts without it; SSD_JAX_DISTRIBUTED=1 calls it anyway (JAX then
  reads the slice from the TPU metadata).

SSD_JAX_DISTRIBUTED=1 forces the call (cluster auto-detection), =0 never makes it.
"""

import os

import jax


def _count(name):
  try:
    return int(os.environ.get(name, '1'))
  except ValueError:
    return 1


def multi_process_env():
  """True when the environment describes more than one JAX process."""
  forced = os.environ.get('SSD_JAX_DISTRIBUTED')
  if forced in ('0', '1'):
    return forced == '1'
  if os.environ.get('JAX_COORDINATOR_ADDRESS') and _count('JAX_NUM_PROCESSES') > 1:
    return True
  # SLURM_NTASKS is also set in an sbatch allocation outside `srun`, where there is one
  # process; SLURM_STEP_NUM_TASKS only inside a job step.
  return (_count('SLURM_STEP_NUM_TASKS') > 1 or _count('OMPI_COMM_WORLD_SIZE') > 1
          or ',' in os.environ.get('TPU_WORKER_HOSTNAMES', ''))


def _explicit_args():
  """coordinator_address, num_processes and process_id from JAX_* variables, if set."""
  address = os.environ.get('JAX_COORDINATOR_ADDRESS')
  if not address or 'JAX_NUM_PROCESSES' not in os.environ:
    return {}
  if 'JAX_PROCESS_ID' not in os.environ:
    raise ValueError(f'JAX_COORDINATOR_ADDRESS={address} and JAX_NUM_PROCESSES='
                     f'{os.environ["JAX_NUM_PROCESSES"]} are set but JAX_PROCESS_ID is not; '
                     'set it to this process\'s index (0 on the coordinator\'s host).')
  return dict(coordinator_address=address, num_processes=int(os.environ['JAX_NUM_PROCESSES']),
              process_id=int(os.environ['JAX_PROCESS_ID']))


def setup():
  """Call first, before anything touches a device."""
  # Random numbers must not depend on how arrays are sharded.
  jax.config.update('jax_threefry_partitionable', True)
  if multi_process_env() and not jax.distributed.is_initialized():
    jax.distributed.initialize(**_explicit_args())


def quiet_logs():
  """Orbax and tfds log every file they touch at INFO; keep the console for progress."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
