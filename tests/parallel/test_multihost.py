"""Multi-host for real on CPU: 2 processes x 4 devices take the same train step as 1 process x 8 devices.

Each worker (`multihost_worker.py`) joins a `jax.distributed` job on 127.0.0.1 (gloo collectives), builds
the tiny Flamingo state as the training loop does, feeds only its own rows of the synthetic mixture and
runs one jitted step on a {'data': 4, 'fsdp': 2} mesh over the 8 global devices. Process 0 alone writes
the gathered results; the test process runs the same step on its own 8 devices and compares.
"""

import os
import re
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from flamingo_jax.data import synthetic
from tests.parallel import multihost_worker

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 900  # the whole job; compiles are slow on a loaded 2-core machine


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  """This process's environment (conftest's XLA flags: same numerics) with 4 CPU devices, not 8."""
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  return dict(
    os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=4".strip()
  )


def _tree(results: dict, prefix: str) -> dict:
  """{'path': array} for the keys under `prefix/`."""
  return {k[len(prefix) + 1 :]: v for k, v in results.items() if k.startswith(prefix + "/")}


def _assert_normwise_close(actual: dict, expected: dict, rtol=1e-5):
  """As tests/train/test_step.py: relative error over the whole tree, max-wise and 2-norm-wise."""
  assert sorted(actual) == sorted(expected)
  a, e = (np.concatenate([np.ravel(t[k]).astype(np.float64) for k in sorted(t)]) for t in (actual, expected))
  assert np.max(np.abs(a - e)) <= rtol * np.max(np.abs(e))
  assert np.linalg.norm(a - e) <= rtol * np.linalg.norm(e)


def _run_job(out_dir):
  """Starts the 2 workers, runs the 1-process reference meanwhile, waits. Kills the workers on failure."""
  port, env, procs, logs = _free_port(), _worker_env(), [], []
  try:
    for pid in range(NUM_PROCESSES):
      log = open(os.path.join(out_dir, f"worker_{pid}.log"), "w+", encoding="utf-8")  # noqa: SIM115
      logs.append(log)
      procs.append(
        subprocess.Popen(
          [
            sys.executable,
            WORKER,
            f"--port={port}",
            f"--process_id={pid}",
            f"--num_processes={NUM_PROCESSES}",
            f"--out={out_dir}",
          ],
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
        )
      )
    reference = multihost_worker.run_step(multihost_worker.make_config())
    deadline = time.time() + TIMEOUT_S
    for pid, proc in enumerate(procs):
      try:
        proc.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        pytest.fail(f"worker {pid} still running after {TIMEOUT_S} s:\n{_read(logs[pid])}")
      assert proc.returncode == 0, f"worker {pid} exited {proc.returncode}:\n{_read(logs[pid])}"
    return reference, [_read(log) for log in logs]
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)
    for log in logs:
      log.close()


def _read(log) -> str:
  log.flush()
  log.seek(0)
  return log.read()[-5000:]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
  out_dir = str(tmp_path_factory.mktemp("multihost"))
  reference, outputs = _run_job(out_dir)
  written = sorted(f for f in os.listdir(out_dir) if not f.endswith(".log"))
  with np.load(os.path.join(out_dir, "process_0.npz"), allow_pickle=False) as f:
    results = dict(f)
  return reference, results, written, outputs


def test_two_processes_see_eight_devices_and_only_process_0_writes(job):
  _, _, written, outputs = job
  assert written == ["process_0.npz"]  # process 1 wrote nothing
  for pid, out in enumerate(outputs):
    assert f"DONE process {pid} of 2, 8 devices" in out, out


def test_same_loss_and_params_as_one_process(job):
  reference, results, _, _ = job
  assert jax.device_count() == 8 and jax.process_count() == 1
  np.testing.assert_allclose(results["loss"], reference["loss"], rtol=1e-5)
  np.testing.assert_allclose(results["grad_norm"], reference["grad_norm"], rtol=1e-5)
  # Same initial state (same seed, same init on every process) ...
  init, ref_init = _tree(results, "init"), _tree(reference, "init")
  assert sorted(init) == sorted(ref_init) and init
  for key in init:
    np.testing.assert_array_equal(init[key], ref_init[key], err_msg=key)
  # ... and the same update, compared normwise (fp32 reductions run in another order).
  delta = lambda r: {k: v - r[f"init/{k}"] for k, v in _tree(r, "new").items()}
  assert any(np.any(v != 0) for v in delta(results).values())
  _assert_normwise_close(delta(results), delta(reference))
  _assert_normwise_close(_tree(results, "new"), _tree(reference, "new"))


def test_each_host_feeds_its_own_disjoint_rows(job):
  reference, results, _, _ = job
  full = _tree(reference, "global")  # the 1-host batch
  hosts = [_tree(results, f"host{p}") for p in range(NUM_PROCESSES)]
  assert sorted(full) == sorted(hosts[0]) == sorted(hosts[1])
  for key, rows in full.items():
    assert hosts[0][key].shape[0] == hosts[1][key].shape[0] == rows.shape[0] // NUM_PROCESSES
    np.testing.assert_array_equal(np.concatenate([hosts[0][key], hosts[1][key]]), rows, err_msg=key)
    np.testing.assert_array_equal(results[f"global/{key}"], rows, err_msg=key)  # host_to_global
  for key in [k for k in full if k.endswith("/images")]:
    a, b = (h[key].reshape(h[key].shape[0], -1) for h in hosts)
    assert not np.any(np.all(a[:, None] == b[None], axis=-1)), f"{key}: a row on both hosts"


def test_synthetic_mixture_splits_every_dataset_by_host():
  """All datasets of the tiny config, numpy only: host rows are disjoint and tile the 1-host batch."""
  from configs import flamingo as flamingo_config  # pylint: disable=g-import-not-at-top

  config = flamingo_config.get_config("size=tiny")
  kwargs = dict(
    datasets={k: dict(v) for k, v in config.data.datasets.items()},
    vocab_size=64,
    image_id=64,
    eoc_id=65,
    seed=3,
  )
  whole = next(synthetic.SyntheticMixture(**kwargs))
  parts = [next(synthetic.SyntheticMixture(**kwargs, process_index=p, process_count=2)) for p in range(2)]
  assert sorted(whole) == ["m3w", "pairs", "vtp"]
  for name, batch in whole.items():
    for key, rows in batch.items():
      np.testing.assert_array_equal(
        np.concatenate([parts[0][name][key], parts[1][name][key]]), rows, err_msg=f"{name}/{key}"
      )
    a, b = (p[name]["images"].reshape(len(p[name]["images"]), -1) for p in parts)
    assert not np.any(np.all(a[:, None] == b[None], axis=-1))
