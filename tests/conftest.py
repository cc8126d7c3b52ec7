"""Test set-up: 8 fake CPU devices (set before JAX is imported) so sharded code runs."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TFDS_DATA_DIR', '/nonexistent-tfds-dir-for-tests')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

jax.config.update('jax_threefry_partitionable', True)
