"""Orbax checkpoints of a run: train state + data iterator state + config, one composite per step.

Layout (`Checkpointer(workdir)`):
  WORKDIR/checkpoints/<step>/state/   any pytree of jax/numpy arrays (the TrainState), Orbax
                                      PyTreeCheckpointHandler; every host writes its shards.
                            data/     JSON: the data iterator state (must be the same on every host:
                                      only process 0's copy is written).
                            config/   JSON: the run's config (written by process 0 only).
                            fingerprints/  JSON: one uint32 per state leaf (`fingerprint.py`),
                                      checked on restore: Orbax keeps no checksum of array data.

Atomicity: Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it into place when
complete (on GCS, `commit_success.txt` marks it complete). A process killed mid-save leaves only
that temporary directory: never listed as a step, deleted by the next `Checkpointer`
(`cleanup_tmp_directories`), so `latest_step()` is the previous complete step.

Async saves: `save` returns once the arrays are copied to host memory (the state may then be donated
to the next step) and writes in a background thread. `check_saves()` at every step boundary turns a
failed background write (disk full, no permission, quota) into `CheckpointSaveError` naming the step
and the cause; Orbax deletes old steps only after a new one is complete, so they stay restorable.
Call `wait()` or `close()` before exiting.

Unreadable steps (`restore_newest`): a step whose files do not read (flipped bytes, which the
fingerprints catch; truncated metadata; a missing item) is moved to WORKDIR/checkpoints_corrupt/<step>
(renamed, never deleted) and the next newest step is tried; `fallback=False` makes it an error. A
template mismatch (another model or optimizer) is never a reason to fall back: it raises.
Preemption (SIGTERM -> save at the next step boundary) is `flamingo_jax/train/preemption.py`.
"""

import contextlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # not exported; Orbax's default

from flamingo_jax import fingerprint
from flamingo_jax.checkpoint_errors import (
  STATE,
  CheckpointReadError,
  CheckpointSaveError,
  NoReadableCheckpointError,
  TemplateMismatchError,
  check_template,
)
from flamingo_jax.parallel.sharding import path_str

CHECKPOINTS_DIR = "checkpoints"
# Orbax cuts a replicated shard into one slice per replica so that replicas write in parallel. Each
# slice is a small program compiled per shape and device: hundreds for a parameter tree (~9 s of a
# process's first save on 8 CPU devices). A slice below this size is written whole by one replica.
REPLICA_PARALLEL_MIN_SLICE_BYTES = 1 << 20
CORRUPT_DIR = "checkpoints_corrupt"
DATA, CONFIG, FINGERPRINTS = "data", "config", "fingerprints"


def _type_handlers() -> ocp.type_handlers.TypeHandlerRegistry:
  """Orbax's standard handlers, except jax.Arrays: replica-parallel only from
  `REPLICA_PARALLEL_MIN_SLICE_BYTES` per slice (the array metadata kept as Orbax's default keeps it)."""
  handlers = ocp.type_handlers
  arrays = handlers.ArrayHandler(
    min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_SLICE_BYTES,
    array_metadata_store=array_metadata_store.Store(),
  )
  others = [(ty, handlers.get_type_handler(ty)) for ty in handlers.supported_types() if ty is not jax.Array]
  return handlers.create_type_handler_registry((jax.Array, arrays), *others)


def _all_processes(ok: bool) -> bool:
  """True when `ok` holds on every process (a collective under multi-host)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _to_json(value, where: str):
  """A JSON-able copy of `value` (numpy scalars become Python numbers); raises naming the key."""
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f"{where}: key {k!r} is not a string (JSON needs string keys)")
      out[k] = _to_json(v, f"{where}.{k}")
    return out
  if isinstance(value, (list, tuple)):
    return [_to_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f"{where} = {value!r} ({type(value).__name__}) is not JSON-able")


def _config_json(config) -> dict | None:
  if config is None:
    return None
  if hasattr(config, "to_json_best_effort"):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return _to_json(config, "config")


def abstract_like(tree):
  """jax.ShapeDtypeStruct leaves (with the leaves' shardings) for a restore template.

  jax.Array -> ShapeDtypeStruct(shape, dtype, sharding=x.sharding); ShapeDtypeStructs (which must
  carry a sharding) and numpy leaves (restored as numpy) are kept.
  """

  def one(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      raise ValueError(
        f"template leaf {path_str(path)}: a ShapeDtypeStruct without a sharding "
        "(give it one, or use a numpy array to restore into host memory)"
      )
    return x

  return jax.tree_util.tree_map_with_path(one, tree)


class Checkpointer:
  """Saves and restores {state, data, config} per step under WORKDIR/checkpoints (Orbax).

  Every host must construct it and call `save`/`restore`/`wait`/`close` at the same points.
  """

  def __init__(
    self,
    workdir,
    *,
    save_interval_steps: int = 1,
    max_to_keep: int | None = None,
    config=None,
    async_save: bool = True,
    async_timeout_s: int = 1200,
  ):
    """Opens (creating if needed) WORKDIR/checkpoints and removes leftovers of killed saves.

    Args:
      workdir: the run directory (local path or gs://...).
      save_interval_steps: `save(step)` writes when step % save_interval_steps == 0 (or force).
      max_to_keep: keep the latest this many steps (None: keep all).
      config: the run's ConfigDict (saved via `to_json_best_effort`) or a JSON-able dict, or None.
      async_save: write in a background thread (`enable_async_checkpointing`).
      async_timeout_s: how long a background save may take before it is an error.
    """
    if int(save_interval_steps) < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and int(max_to_keep) < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    self.directory = absolute_path(workdir) / CHECKPOINTS_DIR
    self._interval = int(save_interval_steps)
    self._config = _config_json(config)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
      max_to_keep=max_to_keep,
      # Exactly every N steps (Orbax's default policy would also save the first call's step).
      save_decision_policy=policies.AnySavePolicy(
        [policies.FixedIntervalPolicy(int(save_interval_steps)), policies.PreemptionCheckpointingPolicy()]
      ),
      create=True,
      cleanup_tmp_directories=True,  # remove the leftovers of a save killed midway
      enable_async_checkpointing=async_save,
      async_options=ocp.AsyncOptions(timeout_secs=int(async_timeout_s)),
    )
    self._pending: int | None = None  # the step of the last save started
    self._manager = ocp.CheckpointManager(
      self.directory,
      options=options,
      item_handlers={
        STATE: ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
        DATA: ocp.JsonCheckpointHandler(),
        CONFIG: ocp.JsonCheckpointHandler(),
        FINGERPRINTS: ocp.JsonCheckpointHandler(),
      },
    )

  def save(self, step: int, state, data_state: Mapping[str, Any], force: bool = False) -> bool:
    """Starts saving `state` (pytree of arrays) and `data_state` (JSON-able dict) as `step`.

    Returns True when a save started: step % save_interval_steps == 0 or `force`, and `step` is
    not already saved (saving a step twice is a no-op returning False).
    """
    step = int(step)
    wanted = force or step % self._interval == 0 or self._manager.reached_preemption(step)
    if step in self._manager.all_steps() or not wanted:
      return False  # decided before the fingerprints, which read the whole state
    items = {
      STATE: ocp.args.PyTreeSave(state),
      DATA: ocp.args.JsonSave(_to_json(data_state, "data_state")),
      FINGERPRINTS: ocp.args.JsonSave(fingerprint.fingerprints(state)),
    }
    if self._config is not None:
      items[CONFIG] = ocp.args.JsonSave(self._config)
    with self._save_errors():  # Orbax first waits for the previous save, which may have failed
      started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
    if started:
      self._pending = step
    return started

  @contextlib.contextmanager
  def _save_errors(self):
    """Turns an error of the pending background save into CheckpointSaveError (step and cause)."""
    pending = self._pending
    try:
      yield
    except CheckpointSaveError:
      raise
    except Exception as error:  # pylint: disable=broad-except  # Orbax re-raises the writer's error
      self._pending = None
      raise CheckpointSaveError(
        f"saving checkpoint step {pending} to {self.directory} failed: {type(error).__name__}: "
        f"{error}; the steps saved before it are intact ({self.all_steps()})"
      ) from error

  def check_saves(self) -> None:
    """Raises CheckpointSaveError if the last background save failed (never blocks on a running one).

    Call it at every step boundary: a failed save then stops the run within one step."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    with self._save_errors():
      self._manager.wait_until_finished()
    self._pending = None

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _step(self, step: int | None) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
    elif int(step) not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.all_steps()})")
    return int(step)

  def restore(
    self, step: int | None = None, state_template=None, restore_data: bool = True
  ) -> tuple[Any, dict | None]:
    """(state, data_state) of `step` (default: the latest).

    Args:
      step: which step; None = the latest.
      state_template: a pytree like the saved state whose leaves are jax.Arrays or
        jax.ShapeDtypeStructs carrying the target shardings (restore onto any mesh), or numpy arrays
        (restored as numpy). The result has the template's structure (NamedTuples included) and
        dtypes. None: restore as saved (NamedTuples come back as dicts, tuples as lists, arrays on
        the saved sharding, which must exist on this topology).
      restore_data: also read the data iterator state (else the second result is None).

    Raises:
      FileNotFoundError: no such step.
      TemplateMismatchError: the template's leaves or shapes differ from the checkpoint.
      CheckpointReadError: the step's files do not read (corrupt, truncated or missing).
    """
    step = self._step(step)
    template = None if state_template is None else abstract_like(state_template)
    try:
      items = {}
      if template is None:
        items[STATE] = ocp.args.PyTreeRestore()
      else:
        saved = self._manager.item_metadata(step)
        if saved is None or saved.get(STATE) is None:
          raise FileNotFoundError(f"no readable {STATE}/ item in {self.directory / str(step)}")
        check_template(f"{self.directory}/{step}/{STATE}", saved[STATE], template)
        items[STATE] = ocp.args.PyTreeRestore(template, ocp.checkpoint_utils.construct_restore_args(template))
      if restore_data:
        items[DATA] = ocp.args.JsonRestore()
      checked = (self.directory / str(step) / FINGERPRINTS).exists()  # older steps have none
      if checked:
        items[FINGERPRINTS] = ocp.args.JsonRestore()
      out = self._manager.restore(step, args=ocp.args.Composite(**items))
      differ = fingerprint.mismatches(out[FINGERPRINTS], out[STATE]) if checked else []
      if differ:
        raise CheckpointReadError(
          step,
          self.directory / str(step) / STATE,
          ValueError(
            f"the restored content differs from the fingerprint saved with it for {len(differ)} "
            f"array(s), first {differ[:3]}"
          ),
        )
    except (TemplateMismatchError, CheckpointReadError):
      raise
    except Exception as error:  # pylint: disable=broad-except  # tensorstore/JSON/Orbax: all unreadable
      raise CheckpointReadError(step, self.directory / str(step), error) from error
    return out[STATE], (out[DATA] if restore_data else None)

  def restore_newest(self, state_template, *, fallback: bool = True) -> tuple[int, Any, dict | None]:
    """(step, state, data_state) of the newest step that reads and matches `state_template`.

    An unreadable step is logged in one line and moved to WORKDIR/checkpoints_corrupt/ (renamed,
    never deleted), then the next newest is tried. Every process must call it: a step counts as
    readable when it read on every process, and process 0 moves the bad ones aside.

    Raises:
      CheckpointReadError: `fallback=False` and the newest step does not read.
      NoReadableCheckpointError: no step reads (every one was moved aside) or there is none.
      TemplateMismatchError: a readable step that differs from the template.
    """
    moved = []
    while (step := self.latest_step()) is not None:
      error = None
      try:
        state, data_state = self.restore(step, state_template)
      except CheckpointReadError as e:
        error = e
      if _all_processes(error is None):
        return step, state, data_state
      if error is None:
        error = CheckpointReadError(
          step, self.directory / str(step), RuntimeError("unreadable on another process")
        )
      if not fallback:
        raise error
      dest = self._move_aside(step)
      logging.warning("%s; moved it to %s and trying the next newest step", error, dest)
      moved.append(f"{step} ({error.path})")
    raise NoReadableCheckpointError(
      f"no readable checkpoint in {self.directory}"
      + (f"; unreadable steps moved to {self.directory.parent / CORRUPT_DIR}: {moved}" if moved else "")
    )

  def _move_aside(self, step: int) -> epath.Path:
    """Renames checkpoints/<step> to checkpoints_corrupt/<step>[.n] (process 0), then all reload."""
    root = self.directory.parent / CORRUPT_DIR
    dest, n = root / str(step), 0
    while dest.exists():
      n += 1
      dest = root / f"{step}.{n}"
    if jax.process_index() == 0:
      root.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
    self._manager.reload()
    return dest

  def restore_config(self, step: int | None = None) -> dict | None:
    """The config JSON saved with `step` (default: the latest), None if none was saved."""
    step = self._step(step)
    if not (self.directory / str(step) / CONFIG).exists():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(**{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    """Blocks until every started (async) save is complete on disk; CheckpointSaveError if one failed."""
    with self._save_errors():
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    """Waits for pending saves (raising CheckpointSaveError if one failed), then releases Orbax."""
    try:
      self.wait()
    finally:
      self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def absolute_path(path) -> epath.Path:
  """`path` as an absolute epath (Orbax refuses relative paths); URLs such as gs://... unchanged."""
  text = os.fspath(path)
  return epath.Path(text if "://" in text else os.path.abspath(text))


def step_dir(root: epath.Path, step: int | None = None) -> epath.Path | None:
  """The directory of a complete `step` (default: the latest) under an Orbax manager `root`."""
  name_format = ocp.path.step.standard_name_format()
  if step is None:
    meta = ocp.path.step.latest_step_metadata(root, name_format)
    return None if meta is None else meta.path
  return ocp.path.step.find_step_path(root, name_format, step=int(step))


def latest_checkpoint_step(workdir) -> int | None:
  """The latest complete step under WORKDIR/checkpoints (no manager, nothing created)."""
  root = absolute_path(workdir) / CHECKPOINTS_DIR
  found = step_dir(root) if root.exists() else None
  return None if found is None else int(found.name)
