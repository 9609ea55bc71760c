"""Checkpoint faults: a corrupt newest step is moved aside and the next one restored (or, with the
fallback off, one error naming the step and the file); a failed background save is reported."""

import logging
import os
import time

import numpy as np
import pytest

from flamingo_jax import checkpoint, checkpoint_errors
from tests import checkpoint_faults


def _state(seed):
  rng = np.random.default_rng(seed)
  return {
    "params": {"w": rng.standard_normal((64, 64)).astype(np.float32)},
    "step": np.asarray(seed, np.int32),
  }


def _three_steps(workdir):
  with checkpoint.Checkpointer(workdir, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _state(step), {"step": step}, force=True)
  return os.path.join(workdir, checkpoint.CHECKPOINTS_DIR, "3")


@pytest.mark.parametrize("kind", checkpoint_faults.CORRUPTIONS)
def test_corrupt_newest_step_is_moved_aside_and_the_next_restored(tmp_path, kind, caplog):
  hit = checkpoint_faults.corrupt_step(_three_steps(str(tmp_path)), kind)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
  with caplog.at_level(logging.WARNING):
    step, state, data = ckpt.restore_newest(_state(0))
  assert step == 2 and data == {"step": 2}
  np.testing.assert_array_equal(state["params"]["w"], _state(2)["params"]["w"])
  assert ckpt.all_steps() == [1, 2]
  assert os.listdir(tmp_path / checkpoint.CORRUPT_DIR) == ["3"]  # kept, not deleted
  warning = next(r.getMessage() for r in caplog.records if "cannot be read" in r.getMessage())
  assert "checkpoint step 3" in warning and "checkpoints_corrupt/3" in warning
  named = hit if kind != "flipped_bytes" else os.path.dirname(os.path.dirname(os.path.dirname(hit)))
  assert os.path.relpath(named, tmp_path) in warning  # the file (or the state item)
  ckpt.close()


@pytest.mark.parametrize("kind", checkpoint_faults.CORRUPTIONS)
def test_fallback_off_gives_one_error_naming_step_and_file(tmp_path, kind):
  checkpoint_faults.corrupt_step(_three_steps(str(tmp_path)), kind)
  ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
  with pytest.raises(checkpoint.CheckpointReadError) as e:
    ckpt.restore_newest(_state(0), fallback=False)
  message = str(e.value)
  assert "\n" not in message and message.startswith("checkpoint step 3 cannot be read: ")
  assert e.value.step == 3 and e.value.path.startswith(str(tmp_path / "checkpoints" / "3"))
  assert {
    "flipped_bytes": "fingerprint",
    "truncated_metadata": "_METADATA: JSONDecodeError",
    "missing_item": "no readable state/ item",
  }[kind] in message
  assert ckpt.all_steps() == [1, 2, 3]  # nothing moved
  ckpt.close()


def test_no_readable_step_is_an_error_listing_what_was_moved(tmp_path):
  _three_steps(str(tmp_path))
  for step in ("1", "2", "3"):
    checkpoint_faults.corrupt_step(str(tmp_path / "checkpoints" / step), "missing_item")
  ckpt = checkpoint.Checkpointer(tmp_path)
  with pytest.raises(checkpoint_errors.NoReadableCheckpointError, match=r"moved to .*: \['3 "):
    ckpt.restore_newest(_state(0))
  assert sorted(os.listdir(tmp_path / checkpoint.CORRUPT_DIR)) == ["1", "2", "3"]
  ckpt.close()


def test_a_step_moved_aside_twice_keeps_both_copies(tmp_path):
  for _ in range(2):
    checkpoint_faults.corrupt_step(_three_steps(str(tmp_path)), "missing_item")
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=3)
    assert ckpt.restore_newest(_state(0))[0] == 2
    ckpt.close()
  assert sorted(os.listdir(tmp_path / checkpoint.CORRUPT_DIR)) == ["3", "3.1"]


def test_a_failed_background_save_is_reported_and_older_steps_stay(tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path)
  ckpt.save(1, _state(1), {"step": 1}, force=True)
  ckpt.wait()
  with checkpoint_faults.disk_full_from_step(2):
    ckpt.save(2, _state(2), {"step": 2}, force=True)  # returns at once; the write fails later
    deadline = time.time() + 60
    with pytest.raises(checkpoint.CheckpointSaveError) as e:
      while time.time() < deadline:
        ckpt.check_saves()
        time.sleep(0.01)
  assert "saving checkpoint step 2" in str(e.value) and "No space left on device" in str(e.value)
  assert "the steps saved before it are intact ([1])" in str(e.value)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path)  # the half-written step 2 is cleaned up
  assert ckpt.all_steps() == [1]
  state, data = ckpt.restore(1, _state(0))
  np.testing.assert_array_equal(state["params"]["w"], _state(1)["params"]["w"])
  assert data == {"step": 1}
  ckpt.close()
