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


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
SIZED = ("flamingo_jax", "configs", "launch", "benchmarks")


def _python_files():
  for top in SIZED:
    for folder, _, names in os.walk(os.path.join(ROOT, top)):
      yield from (os.path.join(folder, n) for n in sorted(names) if n.endswith(".py"))


def test_files_and_functions_stay_small():
  """Files of at most 400 lines; a function over 60 lines says why in a docstring line 'Long: ...'."""
  import ast  # pylint: disable=g-import-not-at-top

  problems = []
  for path in _python_files():
    with open(path, encoding="utf-8") as f:
      text = f.read()
    name = os.path.relpath(path, ROOT)
    if text.count("\n") > MAX_FILE_LINES:
      problems.append(f"{name}: {text.count(chr(10))} lines")
    for node in ast.walk(ast.parse(text)):
      if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES and "Long:" not in (ast.get_docstring(node) or ""):
          problems.append(f"{name}:{node.lineno} {node.name}: {length} lines, no 'Long:' reason")
  assert not problems, "\n".join(problems)
