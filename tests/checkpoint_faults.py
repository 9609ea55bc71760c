"""Faults injected into saved checkpoints and into the writer, shared by the checkpoint and loop tests."""

import contextlib
import errno
import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

CORRUPTIONS = ("flipped_bytes", "truncated_metadata", "missing_item")


def _raw_leaves(state_dir: str) -> list:
  """The saved state's leaves as Orbax reads them, with no fingerprint check (numpy)."""
  checkpointer = ocp.StandardCheckpointer()
  try:
    leaves = jax.tree.leaves(checkpointer.restore(state_dir))
  finally:
    checkpointer.close()
  key = lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x
  return [np.asarray(key(x)) for x in leaves]


def _invert(path: str, offset: int, count: int = 64) -> None:
  """Inverts `count` bytes of `path` at `offset` in place (a second call undoes it)."""
  with open(path, "r+b") as f:
    f.seek(offset)
    data = bytes(b ^ 0xFF for b in f.read(count))
    f.seek(offset)
    f.write(data)


def _flip_bytes_that_are_read(state_dir: str) -> str:
  """Inverts 64 bytes of an array data file where Orbax still reads without error but restores other
  values. An OCDBT data file also holds superseded index nodes that no read visits, so each place is
  checked against a raw read and undone if it changed nothing."""
  before = _raw_leaves(state_dir)
  pattern = os.path.join(state_dir, "**", "d", "*")
  files = sorted((f for f in glob.glob(pattern, recursive=True) if os.path.isfile(f)), key=os.path.getsize)
  for target in reversed(files):
    size = os.path.getsize(target)
    for fraction in (0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875):
      offset = min(int(size * fraction), max(size - 64, 0))
      _invert(target, offset)
      try:
        after = _raw_leaves(state_dir)
      except Exception:  # pylint: disable=broad-except  # a decode error: not the silent kind wanted
        after = before
      if any(not np.array_equal(a, b) for a, b in zip(before, after)):
        return target
      _invert(target, offset)
  raise AssertionError(f"no 64 inverted bytes under {state_dir} change what Orbax restores")


def corrupt_step(step_dir: str, kind: str) -> str:
  """Damages the saved step at `step_dir` in one of CORRUPTIONS' ways; returns the file or directory hit.

  flipped_bytes: 64 bytes inverted in an array data file, where Orbax restores other values without
  an error (only the fingerprints notice); truncated_metadata: the state item's `_METADATA` JSON cut
  in half; missing_item: the state item directory removed.
  """
  state = os.path.join(step_dir, "state")
  if kind == "flipped_bytes":
    return _flip_bytes_that_are_read(state)
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
