"""The training loop end to end on the tiny model with synthetic data: metrics, resume, SIGTERM, SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from configs import flamingo as flamingo_config
from flamingo_jax import checkpoint as checkpoint_lib
from flamingo_jax.train import loop

STEPS = 12
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(steps=STEPS):
  config = flamingo_config.get_config(f"size=tiny,steps={steps}")
  with config.unlocked():
    config.train.checkpoint_every = 1
    config.train.log_every = 1
  return config


def _losses(workdir):
  """step -> loss from metrics.jsonl (a resumed run appends; the last record of a step wins)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      out[record["step"]] = record["train/loss"]
  return out


def _final_state(workdir):
  """The latest saved TrainState, as the dict Orbax restores without a template."""
  ckpt = checkpoint_lib.Checkpointer(workdir)
  state, _ = ckpt.restore()
  ckpt.close()
  return jax.device_get(state)


def _start(workdir, steps=STEPS):
  env = dict(os.environ, JAX_PLATFORMS="cpu")     # XLA_FLAGS as set by conftest: same numerics
  cmd = [sys.executable, "-m", "flamingo_jax.train", f"--config=configs/flamingo.py:size=tiny,steps={steps}",
         f"--workdir={workdir}", "--config.train.checkpoint_every=1", "--config.train.log_every=1"]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for_step(workdir, step, proc, timeout=900):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(path) and _losses(workdir) and max(_losses(workdir)) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(proc.stdout.read().decode()[-3000:])
    time.sleep(0.05)
  raise AssertionError("timed out waiting for training steps")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  metrics = loop.train(_config(), workdir)
  return workdir, metrics


def test_run_writes_metrics_tensorboard_and_checkpoint(uninterrupted):
  workdir, metrics = uninterrupted
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert np.isfinite(list(losses.values())).all()
  assert "train/gate/attn_0" in json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
  assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir, "tb")))
  assert os.path.exists(os.path.join(workdir, "config.json"))
  assert int(_final_state(workdir)["step"]) == STEPS
  assert metrics["loss"] == pytest.approx(losses[STEPS])


@pytest.mark.slow   # three training processes: minutes on 2 shared cores (timed out at 300 s under load)
def test_sigterm_then_restart_equals_uninterrupted(uninterrupted, tmp_path):
  straight, _ = uninterrupted
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for_step(workdir, 5, proc)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=900)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  stopped_at = max(_losses(workdir))
  assert stopped_at < STEPS, "the run finished before SIGTERM arrived"
  proc = _start(workdir)                      # a new process resumes from the saved step
  out = proc.communicate(timeout=900)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  assert _losses(workdir) == _losses(straight)
  a, b = _final_state(workdir), _final_state(straight)
  chex.assert_trees_all_equal(a["params"], b["params"])
  chex.assert_trees_all_equal(a["opt_state"], b["opt_state"])
  chex.assert_trees_all_equal(a["frozen"], b["frozen"])


@pytest.mark.slow   # two more training processes; save atomicity under SIGKILL is in tests/test_checkpoint.py
def test_sigkill_then_restart_resumes(uninterrupted, tmp_path):
  straight, _ = uninterrupted
  workdir = str(tmp_path / "run")
  proc = _start(workdir)
  _wait_for_step(workdir, 3, proc)
  proc.kill()                                 # SIGKILL: possibly in the middle of a save
  proc.communicate(timeout=60)
  proc = _start(workdir)
  out = proc.communicate(timeout=900)[0].decode()
  assert proc.returncode == 0, out[-3000:]
  a, b = _final_state(workdir), _final_state(straight)
  assert int(a["step"]) == STEPS
  chex.assert_trees_all_equal(a["params"], b["params"])
