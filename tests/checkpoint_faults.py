"""Faults injected into saved checkpoints and into the writer, shared by the checkpoint and loop tests."""

import contextlib
import errno
import glob
import os
import shutil

import orbax.checkpoint as ocp

CORRUPTIONS = ("flipped_bytes", "truncated_metadata", "missing_item")


def corrupt_step(step_dir: str, kind: str) -> str:
  """Damages the saved step at `step_dir` in one of CORRUPTIONS' ways; returns the file or directory hit.

  flipped_bytes: 64 bytes inverted in the middle of the largest array data file (no error from
  Orbax: only the fingerprints notice); truncated_metadata: the state item's `_METADATA` JSON cut
  in half; missing_item: the state item directory removed.
  """
  state = os.path.join(step_dir, "state")
  if kind == "flipped_bytes":
    files = [f for f in glob.glob(os.path.join(state, "**", "d", "*"), recursive=True) if os.path.isfile(f)]
    target = max(files, key=os.path.getsize)
    with open(target, "r+b") as f:
      data = bytearray(f.read())
      middle = len(data) // 2
      data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
      f.seek(0)
      f.write(data)
    return target
  if kind == "truncated_metadata":
    target = os.path.join(state, "_METADATA")
    with open(target, "r+", encoding="utf-8") as f:
      text = f.read()
      f.seek(0)
      f.truncate()
      f.write(text[: len(text) // 2])
    return target
  if kind == "missing_item":
    shutil.rmtree(state)
    return state
  raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")


@contextlib.contextmanager
def disk_full_from_step(step: int):
  """Every Orbax JSON item write of step >= `step` fails with ENOSPC in the background thread
  (the data, config and fingerprint items of a checkpoint step go through it)."""
  original = ocp.JsonCheckpointHandler._save_fn  # pylint: disable=protected-access

  async def failing(self, item, directory):
    step_name = os.path.basename(os.path.dirname(str(directory))).split(".")[0]
    if step_name.isdigit() and int(step_name) >= step:
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return await original(self, item, directory)

  ocp.JsonCheckpointHandler._save_fn = failing  # pylint: disable=protected-access
  try:
    yield
  finally:
    ocp.JsonCheckpointHandler._save_fn = original  # pylint: disable=protected-access
