"""Two JAX processes on this machine (issue 7), each with 2 fake CPU devices.

The test starts this file twice as a worker (`python tests/test_multihost.py MODE ROOT`) with
JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>, JAX_NUM_PROCESSES=2 and JAX_PROCESS_ID=0/1,
which runtime.setup() turns into jax.distributed.initialize(). The workers train the ar
stage for two steps on one data=4 mesh spanning both processes (each reads its half of
every batch; one Orbax checkpoint written by both), evaluate it, then sample with
sample.py's job. Checked: both hold identical parameters, equal within PARAM_TOL to one
process training on 4 devices; only process 0 logged and wrote metrics and images; the
sampled tokens are those of one process.

Preemption (issue 12): SIGTERM sent to one process only, mid-training; both must stop after
the same step, save there (one collective save, no hang) and exit; a rerun resumes there.
"""

import dataclasses
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import ar as ar_config
from ssd_jax import pretrained
from ssd_jax import runtime
from ssd_jax import sample_job
from ssd_jax import sharding
from ssd_jax.decoding import engine
from ssd_jax.decoding import sampling as sampling_lib
from ssd_jax.training import ar_stage
from ssd_jax.training import checkpoint
from ssd_jax.training import loop
import test_sharding  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 4
SIGTERM_AFTER = 3  # the test sends SIGTERM to process 1 once process 0 logged this step
PREEMPT_STEPS = 10000  # num_steps of the preempted run: it must stop long before
GREEDY = sampling_lib.Sampling(temperature=0.0, cfg_scale=2.0)


def config_for(root):
  # The run folder holds its own tokenizer (<workdir>/tokenizer), so sample.py can load it.
  return test_sharding.stage_config(ar_config, root, tokenizer_dir='', eval_examples=8)


def flat_params(params):
  return {'/'.join(str(k.key) for k in path): sharding.to_host(x)
          for path, x in jax.tree_util.tree_leaves_with_path(params)}


def preempt_config(root):
  config = config_for(root)
  config.num_steps = config.checkpoint_every = PREEMPT_STEPS
  config.log_every = 1
  config.tokenizer_dir = str(root / 'run' / 'tokenizer')
  return config


def without_evaluation(stage):
  return dataclasses.replace(stage, evaluate=lambda *args: {})


def worker(root):
  root = pathlib.Path(root)
  runtime.setup()
  pid = jax.process_index()
  assert (jax.process_count(), jax.device_count()) == (2, 4), 'not one 2-process program'
  workdir = os.path.join(root, 'run')
  config = config_for(root)  # mesh data=-1: all 4 devices of both processes
  state, _ = loop.train(config, workdir, ar_stage.make_stage(config, workdir))
  np.savez(os.path.join(root, f'params_{pid}.npz'), **flat_params(state.params))
  # Per-process output names: only process 0's may appear.
  out = lambda name: os.path.join(root, f'{name}_{pid}')
  sample_job.run(sample_job.SampleArgs(
      method='ar', num_images=NUM_IMAGES, batch_size=NUM_IMAGES, cfg_scale=GREEDY.cfg_scale,
      temperature=GREEDY.temperature, checkpoint=workdir, out=out('samples') + '.png',
      tokens_out=out('tokens') + '.npy', report=out('report') + '.json', progress=False))


def preempted_worker(root):
  """Trains until the test sends SIGTERM to one of the processes; prints the steps saved."""
  root = pathlib.Path(root)
  runtime.setup()
  saved, save = [], checkpoint.StageCheckpoints.save

  def record(self, step, *args, **kwargs):
    saved.append(step)
    return save(self, step, *args, **kwargs)

  checkpoint.StageCheckpoints.save = record
  workdir = os.path.join(root, 'run')
  config = preempt_config(root)
  try:
    loop.train(config, workdir, without_evaluation(ar_stage.make_stage(config, workdir)))
  finally:
    print(f'process {jax.process_index()} saved steps {saved}', flush=True)


WORKERS = {'train_and_sample': worker, 'preempted': preempted_worker}


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_workers(root, mode):
  """Starts the two worker processes of `mode`; each writes its output to <root>/<mode>_<i>.log."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{free_port()}',
             JAX_NUM_PROCESSES='2', PYTHONPATH=os.pathsep.join([REPO, os.path.join(
                 REPO, 'tests')]))
  procs = []
  for i in range(2):
    with open(root / f'{mode}_{i}.log', 'w') as out:
      procs.append(subprocess.Popen(
          [sys.executable, os.path.abspath(__file__), mode, str(root)], cwd=REPO,
          env=dict(env, JAX_PROCESS_ID=str(i)), stdout=out, stderr=subprocess.STDOUT))
  return procs


def finish_workers(root, mode, procs, timeout):
  """Waits for both workers, killing them after `timeout` s (then fails); returns the logs."""
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.time(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return [(root / f'{mode}_{i}.log').read_text() for i in range(2)]


def wait_for_line(root, mode, procs, text, timeout):
  """Waits until process 0's log shows `text`; fails if a worker ends first."""
  deadline = time.time() + timeout
  while text not in (root / f'{mode}_0.log').read_text():
    if time.time() > deadline or any(p.poll() is not None for p in procs):
      logs = finish_workers(root, mode, procs, timeout=1)
      pytest.fail(f'process 0 never logged {text!r}:\n' + '\n'.join(
          log[-3000:] for log in logs))
    time.sleep(0.1)


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
  root = tmp_path_factory.mktemp('multihost')
  test_sharding.write_data(root)
  test_sharding.write_tokenizer(str(root / 'run' / 'tokenizer'))
  procs = start_workers(root, 'train_and_sample')
  logs = finish_workers(root, 'train_and_sample', procs, timeout=400)
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f'worker {i} failed:\n{log[-4000:]}'
  return root, logs


def test_two_processes_train_one_model(two_processes, monkeypatch, tmp_path):
  root, _ = two_processes
  params = [dict(np.load(root / f'params_{i}.npz')) for i in range(2)]
  assert params[0].keys() == params[1].keys()
  for name in params[0]:
    np.testing.assert_array_equal(params[0][name], params[1][name], err_msg=name)
  # One process on 4 devices takes the same step.
  monkeypatch.setattr(sharding, 'mesh_from_config', lambda c: test_sharding.mesh_of(4, 1))
  config = config_for(root)
  config.tokenizer_dir = str(root / 'run' / 'tokenizer')
  stage = ar_stage.make_stage(config, str(tmp_path))
  state, _ = loop.train(config, str(tmp_path),
                        dataclasses.replace(stage, evaluate=lambda *a: {}))
  single = flat_params(state.params)
  diff = max(float(np.max(np.abs(params[0][k] - single[k]))) for k in single)
  print(f'2 processes vs 1 process: max |param diff| = {diff:.2e}')
  assert diff <= test_sharding.PARAM_TOL


def test_only_process_zero_writes(two_processes):
  root, logs = two_processes
  stage_dir = root / 'run' / 'ar'
  assert '[ar] step 2/2' in logs[0] and '[ar]' not in logs[1]
  with open(stage_dir / 'metrics.jsonl') as f:
    assert len(f.readlines()) == 1  # log_every = num_steps = 2: one line, written once
  assert checkpoint.load_json(stage_dir / 'results.json')['step'] == 2
  assert (stage_dir / 'samples.png').exists()  # the evaluation ran on both processes
  for name in ('samples_0.png', 'tokens_0.npy', 'report_0.json'):
    assert (root / name).exists(), name
  assert not list(root.glob('*_1.png')) + list(root.glob('*_1.npy')) + list(
      root.glob('*_1.json'))
  assert checkpoint.StageCheckpoints(str(stage_dir)).latest_step() == 2


def test_two_processes_sample_the_tokens_of_one(two_processes):
  root, _ = two_processes
  bundle = pretrained.load(str(root / 'run'))
  one = engine.generate(bundle, 'ar', GREEDY, NUM_IMAGES, NUM_IMAGES,
                        mesh=test_sharding.mesh_of(1, 1), progress=False)
  np.testing.assert_array_equal(np.load(root / 'tokens_0.npy'), one.tokens)


def test_sigterm_on_one_process_stops_both_at_one_step(tmp_path, monkeypatch, capsys):
  root = tmp_path
  test_sharding.write_data(root)
  test_sharding.write_tokenizer(str(root / 'run' / 'tokenizer'))
  procs = start_workers(root, 'preempted')
  wait_for_line(root, 'preempted', procs, f'[ar] step {SIGTERM_AFTER}/', timeout=120)
  procs[1].send_signal(signal.SIGTERM)  # process 0 is not told
  logs = finish_workers(root, 'preempted', procs, timeout=60)  # a hang fails here

  saved = [re.findall(r'process \d saved steps \[(.*)\]', log) for log in logs]
  assert [p.returncode for p in procs] == [143, 143], '\n'.join(log[-3000:] for log in logs)
  assert saved[0] == saved[1] and len(saved[0]) == 1 and saved[0][0].isdigit(), saved
  stop = int(saved[0][0])  # one save, at the same step on both processes
  assert SIGTERM_AFTER < stop < PREEMPT_STEPS
  assert f'[ar] stopped by SIGTERM at step {stop} (saved)' in logs[0]
  assert checkpoint.StageCheckpoints(str(root / 'run' / 'ar')).latest_step() == stop

  # Rerun (here one process on 4 devices): resumes at that step.
  monkeypatch.setattr(sharding, 'mesh_from_config', lambda c: test_sharding.mesh_of(4, 1))
  config = preempt_config(root)
  config.num_steps = stop + 1
  workdir = str(root / 'run')
  capsys.readouterr()
  state, _ = loop.train(config, workdir,
                        without_evaluation(ar_stage.make_stage(config, workdir)))
  assert re.search(rf'resumed from \S+ at step {stop}\n', capsys.readouterr().out)
  assert int(state.step) == stop + 1


@pytest.mark.parametrize('env,expected', [
    ({}, False),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '4'}, True),
    ({'JAX_COORDINATOR_ADDRESS': '10.0.0.1:1234', 'JAX_NUM_PROCESSES': '1'}, False),
    ({'SLURM_NTASKS': '8'}, False),  # an allocation, but not inside `srun`
    ({'SLURM_STEP_NUM_TASKS': '8'}, True),
    ({'OMPI_COMM_WORLD_SIZE': '2'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'a,b'}, True),
    ({'TPU_WORKER_HOSTNAMES': 'a'}, False),
    ({'SSD_JAX_DISTRIBUTED': '1'}, True),
    ({'SSD_JAX_DISTRIBUTED': '0', 'SLURM_STEP_NUM_TASKS': '8'}, False),
])
def test_which_environments_start_several_processes(monkeypatch, env, expected):
  for name in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID',
               'SLURM_NTASKS', 'SLURM_STEP_NUM_TASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES',
               'SSD_JAX_DISTRIBUTED'):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert runtime.multi_process_env() == expected


def test_a_process_id_is_required(monkeypatch):
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '10.0.0.1:1234')
  monkeypatch.setenv('JAX_NUM_PROCESSES', '2')
  monkeypatch.delenv('JAX_PROCESS_ID', raising=False)
  with pytest.raises(ValueError, match='JAX_PROCESS_ID is not'):
    runtime._explicit_args()  # pylint: disable=protected-access


if __name__ == '__main__':
  WORKERS[sys.argv[1]](sys.argv[2])
