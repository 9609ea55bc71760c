"""What can go wrong with a saved checkpoint, reported in one line that names the step and the file.

`CheckpointReadError` names the innermost file its cause names (tensorstore's "local file ..."),
else the first of the step's Orbax JSON files that does not parse, else a missing item directory,
else the step directory. `flamingo_jax/checkpoint.py` raises these; docs/TRAINING.md ("When things
go wrong") shows what each prints.
"""

import json
import re

import jax
import numpy as np
from etils import epath

from flamingo_jax.parallel.sharding import path_str

STATE = "state"  # the TrainState item of a step directory
# Orbax's JSON files in a step directory (a truncated one is named by `_unreadable_file`).
_JSON_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "_sharding", "metadata", ".zarray", "zarr.json")


class TemplateMismatchError(ValueError):
  """The saved state's leaves or shapes differ from the state template (names the path)."""


class CheckpointReadError(RuntimeError):
  """A saved step whose files cannot be read. `step`, `path` (the file named by the cause, else the
  step directory) and `cause` (one line)."""

  def __init__(self, step: int, step_dir_path, cause: BaseException):
    self.step = int(step)
    text = " ".join(str(cause).split())
    named = re.findall(r'local file "([^"]+)"', text) or re.findall(r"'(/[^']+)'", text)
    # The innermost file the cause names, else the first JSON file of the step that does not parse.
    self.path = named[-1] if named else _unreadable_file(step_dir_path) or str(step_dir_path)
    self.cause = f"{type(cause).__name__}: {text[:240]}"
    super().__init__(f"checkpoint step {self.step} cannot be read: {self.path}: {self.cause}")


class NoReadableCheckpointError(FileNotFoundError):
  """Every step of a run's checkpoints failed to read (each was moved aside)."""


class CheckpointSaveError(RuntimeError):
  """A save that failed in the background; the steps saved before it are intact."""


def _unreadable_file(step_dir_path) -> str | None:
  """The first of the step's Orbax JSON files that does not parse, or its missing item directory."""
  root = epath.Path(step_dir_path)
  if root.name == STATE or not root.exists():
    return None
  if not (root / STATE).exists():
    return str(root / STATE)
  level = [root]
  for _ in range(3):  # step/, step/item/, step/item/array/ (no recursive glob: GCS lists it all)
    files = [p for d in level for p in sorted(d.iterdir())]
    for path in files:
      if path.name in _JSON_FILES and path.is_file():
        try:
          json.loads(path.read_text())
        except (ValueError, OSError):
          return str(path)
    level = [p for p in files if p.is_dir()]
  return None


def check_template(where: str, saved_metadata, template) -> None:
  """Raises TemplateMismatchError naming the path when the saved leaves or shapes differ from the
  template's (`where`: the state item's directory)."""

  def flat(tree):
    return {path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

  saved, wanted = flat(getattr(saved_metadata, "tree", saved_metadata)), flat(template)
  missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
  if missing or extra:
    raise TemplateMismatchError(
      f"{where} does not match the state template: missing from the checkpoint "
      f"{missing[:10]}, not in the template {extra[:10]}"
    )
  for path, leaf in wanted.items():
    shape = getattr(saved[path], "shape", None)
    if shape is not None and tuple(shape) != tuple(np.shape(leaf)):
      raise TemplateMismatchError(
        f"{where}: {path} has shape {tuple(shape)} in the checkpoint, {tuple(np.shape(leaf))} in the template"
      )
