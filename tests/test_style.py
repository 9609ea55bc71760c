"""One code style for the tree: `ruff format` and `ruff check` (rules and reasons in ruff.toml).

Fix a failure with `.venv/bin/ruff format . && .venv/bin/ruff check --fix .`.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _ruff():
  beside = os.path.join(os.path.dirname(sys.executable), "ruff")
  found = beside if os.path.exists(beside) else shutil.which("ruff")
  if found is None:
    pytest.fail("ruff is not installed: bash launch/install.sh installs it (the 'test' extra)")
  return found


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check", "--no-fix"]])
def test_tree_is_formatted_and_lint_clean(command):
  proc = subprocess.run([_ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True, check=False)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
