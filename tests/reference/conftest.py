"""The reference interpreter (launch/reference_env.sh): torch, transformers, open_clip, open-flamingo.

Equivalence tests run its scripts in a subprocess; they skip, naming the command that sets it up,
where it does not exist (`.ci/run` creates it, so CI runs them).
"""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def reference_python() -> str | None:
  path = os.environ.get("REF_VENV", os.path.join(ROOT, ".venv-ref"))
  python = os.path.join(path, "bin", "python")
  return python if os.path.exists(python) else None


@pytest.fixture(scope="session")
def run_reference():
  """run_reference(script, *args): runs tests/reference/<script> in the reference interpreter."""
  python = reference_python()
  if python is None:
    pytest.skip("no reference interpreter: bash launch/reference_env.sh")

  def run(script: str, *args) -> None:
    cmd = [python, os.path.join(HERE, script), *map(str, args)]
    done = subprocess.run(
      cmd, capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": ""}
    )
    if done.returncode:
      raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout}\n{done.stderr}")

  return run
