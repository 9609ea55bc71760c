"""Orbax checkpoints of a run: train state + data iterator state + config, one composite per step.

Layout (`Checkpointer(workdir)`):
  WORKDIR/checkpoints/<step>/state/   any pytree of jax/numpy arrays (the TrainState), Orbax
                                      StandardCheckpointHandler; every host writes its shards.
                            data/     JSON: the data iterator state (must be the same on every host:
                                      only process 0's copy is written).
                            config/   JSON: the run's config (written by process 0 only).

Atomicity: Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it into place when
complete (on GCS, `commit_success.txt` marks it complete). A process killed mid-save leaves only
that temporary directory: never listed as a step, deleted by the next `Checkpointer`
(`cleanup_tmp_directories`), so `latest_step()` is the previous complete step.

Async saves: `save` returns once the arrays are copied to host memory (the state may then be donated
to the next step) and writes in a background thread. Call `wait()` or `close()` before exiting.

Preemption (SIGTERM -> save at the next step boundary) is `flamingo_jax/train/preemption.py`.

Resume order (`resolve_init`): this workdir's latest checkpoint > `init_from` sources > fresh init.
Params paths are Haiku's 'module/path/name' strings (see docs/ARCHITECTURE.md).
"""
import json
import os
import re
from typing import Any, Mapping, NamedTuple, Optional, Sequence

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

CHECKPOINTS_DIR = 'checkpoints'
STATE, DATA, CONFIG = 'state', 'data', 'config'
# flamingo_jax/convert/__main__.py writes DIR/params (StandardCheckpointer) + DIR/lm_config.json.
CONVERTED_PARAMS_DIR = 'params'
SOURCE_KINDS = ('params', 'checkpoint')


def _path_str(keypath) -> str:
  """'params/lm/embed/embeddings' from a jax key path (dict keys, attributes, sequence indices)."""
  parts = []
  for k in keypath:
    for attr in ('key', 'name', 'idx'):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return '/'.join(parts)


def _flat(tree) -> dict[str, Any]:
  return {_path_str(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_json(value, where: str):
  """A JSON-able copy of `value` (numpy scalars become Python numbers); raises naming the key."""
  if isinstance(value, Mapping):
    out = {}
    for k, v in value.items():
      if not isinstance(k, str):
        raise TypeError(f'{where}: key {k!r} is not a string (JSON needs string keys)')
      out[k] = _to_json(v, f'{where}.{k}')
    return out
  if isinstance(value, (list, tuple)):
    return [_to_json(v, f'{where}[{i}]') for i, v in enumerate(value)]
  if isinstance(value, np.generic):
    return value.item()
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise TypeError(f'{where} = {value!r} ({type(value).__name__}) is not JSON-able')


def _config_json(config) -> Optional[dict]:
  if config is None:
    return None
  if hasattr(config, 'to_json_best_effort'):  # ml_collections.ConfigDict
    return json.loads(config.to_json_best_effort())
  return _to_json(config, 'config')


def abstract_like(tree):
  """jax.ShapeDtypeStruct leaves (with the leaves' shardings) for a restore template.

  jax.Array -> ShapeDtypeStruct(shape, dtype, sharding=x.sharding); ShapeDtypeStructs (which must
  carry a sharding) and numpy leaves (restored as numpy) are kept.
  """
  def one(path, x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, jax.ShapeDtypeStruct) and x.sharding is None:
      raise ValueError(f'template leaf {_path_str(path)}: a ShapeDtypeStruct without a sharding '
                       '(give it one, or use a numpy array to restore into host memory)')
    return x
  return jax.tree_util.tree_map_with_path(one, tree)


class Checkpointer:
  """Saves and restores {state, data, config} per step under WORKDIR/checkpoints (Orbax).

  Every host must construct it and call `save`/`restore`/`wait`/`close` at the same points.
  """

  def __init__(self, workdir, *, save_interval_steps: int = 1, max_to_keep: Optional[int] = None,
               config=None, async_save: bool = True, async_timeout_s: int = 1200):
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
      raise ValueError(f'save_interval_steps must be >= 1, got {save_interval_steps}')
    if max_to_keep is not None and int(max_to_keep) < 1:
      raise ValueError(f'max_to_keep must be None or >= 1, got {max_to_keep}')
    self.directory = absolute_path(workdir) / CHECKPOINTS_DIR
    self._config = _config_json(config)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        # Exactly every N steps (Orbax's default policy would also save the first call's step).
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(int(save_interval_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        create=True,
        cleanup_tmp_directories=True,  # remove the leftovers of a save killed midway
        enable_async_checkpointing=async_save,
        async_options=ocp.AsyncOptions(timeout_secs=int(async_timeout_s)))
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: ocp.JsonCheckpointHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})

  def save(self, step: int, state, data_state: Mapping[str, Any], force: bool = False) -> bool:
    """Starts saving `state` (pytree of arrays) and `data_state` (JSON-able dict) as `step`.

    Returns True when a save started: step % save_interval_steps == 0 or `force`, and `step` is
    not already saved (saving a step twice is a no-op returning False).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.StandardSave(state),
             DATA: ocp.args.JsonSave(_to_json(data_state, 'data_state'))}
    if self._config is not None:
      items[CONFIG] = ocp.args.JsonSave(self._config)
    return bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))

  def latest_step(self) -> Optional[int]:
    """The newest complete step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def _step(self, step: Optional[int]) -> int:
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f'no complete checkpoint in {self.directory}')
    elif int(step) not in self._manager.all_steps():
      raise FileNotFoundError(f'no checkpoint for step {step} in {self.directory} '
                              f'(have {self.all_steps()})')
    return int(step)

  def _check_template(self, step: int, template) -> None:
    """Raises naming the path when `template` and the saved state differ in leaves or shapes."""
    saved = self._manager.item_metadata(step)[STATE]
    saved = _flat(getattr(saved, 'tree', saved))
    wanted = _flat(template)
    where = f'{self.directory}/{step}/{STATE}'
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if missing or extra:
      raise ValueError(f'{where} does not match the state template: missing from the checkpoint '
                       f'{missing[:10]}, not in the template {extra[:10]}')
    for path, leaf in wanted.items():
      shape = getattr(saved[path], 'shape', None)
      if shape is not None and tuple(shape) != tuple(np.shape(leaf)):
        raise ValueError(f'{where}: {path} has shape {tuple(shape)} in the checkpoint, '
                         f'{tuple(np.shape(leaf))} in the template')

  def restore(self, step: Optional[int] = None, state_template=None,
              restore_data: bool = True) -> tuple[Any, Optional[dict]]:
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
      ValueError: the template's leaves or shapes differ from the checkpoint (names the path).
    """
    step = self._step(step)
    if state_template is None:
      state_args = ocp.args.StandardRestore()
    else:
      template = abstract_like(state_template)
      self._check_template(step, template)
      state_args = ocp.args.StandardRestore(template)
    items = {STATE: state_args}
    if restore_data:
      items[DATA] = ocp.args.JsonRestore()
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return out[STATE], (out[DATA] if restore_data else None)

  def restore_config(self, step: Optional[int] = None) -> Optional[dict]:
    """The config JSON saved with `step` (default: the latest), None if none was saved."""
    step = self._step(step)
    if not (self.directory / str(step) / CONFIG).exists():
      return None
    return self._manager.restore(step, args=ocp.args.Composite(
        **{CONFIG: ocp.args.JsonRestore()}))[CONFIG]

  def wait(self) -> None:
    """Blocks until every started (async) save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves, then releases Orbax's threads."""
    self._manager.wait_until_finished()
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------ resume order, init_from sources


class InitSource(NamedTuple):
  """One `init_from` entry: load the template params matching `select` from `path`.

  kind: 'checkpoint' (another run: its workdir, its checkpoints/ dir or a step dir; the
  TrainState's `params` and `frozen` trees are searched) or 'params' (a params-only Orbax
  StandardCheckpointer save: the converter's DIR (uses DIR/params) or the save directory itself).
  A source param 'P' is offered as template param `add_prefix + P[len(strip_prefix):]`; with a
  `strip_prefix`, source params not starting with it are ignored.
  """
  path: str
  kind: str
  select: str
  strip_prefix: str = ''
  add_prefix: str = ''

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'InitSource':
    d = dict(d)
    unknown = sorted(set(d) - set(cls._fields))
    missing = sorted({'path', 'kind', 'select'} - set(d))
    if unknown or missing:
      raise ValueError(f'init_from source {d}: unknown keys {unknown}, missing keys {missing} '
                       f'(keys: {cls._fields})')
    if d['kind'] not in SOURCE_KINDS:
      raise ValueError(f'init_from source {d}: kind must be one of {SOURCE_KINDS}')
    re.compile(d['select'])
    return cls(**{k: str(v) for k, v in d.items()})


class InitPlan(NamedTuple):
  which: str                        # 'resume' | 'init_from' | 'fresh'
  step: Optional[int]               # the step to resume from ('resume' only)
  sources: tuple[InitSource, ...]   # the sources to load ('init_from' only)


def absolute_path(path) -> epath.Path:
  """`path` as an absolute epath (Orbax refuses relative paths); URLs such as gs://... unchanged."""
  text = os.fspath(path)
  return epath.Path(text if '://' in text else os.path.abspath(text))


def _step_dir(root: epath.Path, step: Optional[int] = None) -> Optional[epath.Path]:
  """The directory of a complete `step` (default: the latest) under an Orbax manager `root`."""
  name_format = ocp.path.step.standard_name_format()
  if step is None:
    meta = ocp.path.step.latest_step_metadata(root, name_format)
    return None if meta is None else meta.path
  return ocp.path.step.find_step_path(root, name_format, step=int(step))


def latest_checkpoint_step(workdir) -> Optional[int]:
  """The latest complete step under WORKDIR/checkpoints (no manager, nothing created)."""
  root = absolute_path(workdir) / CHECKPOINTS_DIR
  step_dir = _step_dir(root) if root.exists() else None
  return None if step_dir is None else int(step_dir.name)


def resolve_init(workdir, init_from: Sequence[Mapping[str, Any]] = ()) -> InitPlan:
  """Resume order: this workdir's latest checkpoint > `init_from` sources > fresh initialisation.

  Raises:
    ValueError: a malformed source.  FileNotFoundError: a source path that does not exist.
  """
  step = latest_checkpoint_step(workdir)
  if step is not None:
    return InitPlan('resume', step, ())
  sources = tuple(s if isinstance(s, InitSource) else InitSource.from_dict(s)
                  for s in (init_from or ()))
  for s in sources:
    if not absolute_path(s.path).exists():
      raise FileNotFoundError(f'init_from path {s.path} does not exist')
  return InitPlan('init_from' if sources else 'fresh', None, sources)


def _locate_params(path, kind: Optional[str], step: Optional[int]):
  """(pytree item directory, roots: key tuples of the {module: {name: array}} trees in it)."""
  p = absolute_path(path)
  if not p.exists():
    raise FileNotFoundError(f'params source {p} does not exist')
  run_root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).exists() else p
  if kind is None:
    is_run = (p / STATE).exists() or _step_dir(run_root) is not None
    kind = 'checkpoint' if is_run else 'params'
  if kind == 'checkpoint':
    if (p / STATE).exists() and step is None:  # a step directory
      return p / STATE, None
    step_dir = _step_dir(run_root, step)
    if step_dir is None:
      raise FileNotFoundError(f'no complete checkpoint under {run_root}')
    return step_dir / STATE, None
  if kind == 'params':
    item = p / CONVERTED_PARAMS_DIR if (p / CONVERTED_PARAMS_DIR).exists() else p
    return item, ((),)
  raise ValueError(f'kind must be one of {SOURCE_KINDS} or None, got {kind!r}')


def _source_params(tree, roots, where) -> dict[str, tuple[tuple, Any]]:
  """{'module/name': (key tuple in the saved tree, array metadata)}."""
  if roots is None:  # a train state: its trainable and frozen params (or a bare params tree)
    roots = tuple((k,) for k in ('params', 'frozen') if isinstance(tree.get(k), Mapping))
    roots = roots or ((),)
  out = {}
  for root in roots:
    sub = tree
    for k in root:
      sub = sub[k]
    for module, leaves in sub.items():
      if not isinstance(leaves, Mapping):
        raise ValueError(f'{where}: {"/".join(root + (module,))} is not a Haiku params tree '
                         '{module: {name: array}}')
      for name, meta in leaves.items():
        key = f'{module}/{name}'
        if key in out:
          raise ValueError(f'{where}: param {key} appears twice (in {out[key][0][:-2]} and {root})')
        out[key] = (root + (module, name), meta)
  return out


def selected_paths(template, select: str) -> list[str]:
  """The 'module/name' paths of a Haiku params tree that the regex `select` matches (re.search)."""
  pattern = re.compile(select)
  return [f'{m}/{n}' for m, leaves in template.items() for n in leaves
          if pattern.search(f'{m}/{n}')]


def load_params_subset(path, select: str, template, *, kind: Optional[str] = None,
                       strip_prefix: str = '', add_prefix: str = '', step: Optional[int] = None):
  """`template` (Haiku params {module: {name: array}}) with the params matching `select` loaded.

  Only the selected arrays are read from disk (Orbax partial restore). Each loaded leaf takes the
  template leaf's dtype and placement: numpy for numpy leaves, the leaf's sharding for jax.Array /
  ShapeDtypeStruct-with-sharding leaves. Unselected leaves are returned unchanged.

  Args:
    path: another run (workdir, its checkpoints/ or a step dir) or a params-only Orbax save (the
      converter's DIR, or the StandardCheckpointer directory itself).
    select: regex (re.search) over the template's 'module/name' paths.
    template: the params tree to fill in.
    kind: 'checkpoint' | 'params' | None (detected from the directory layout).
    strip_prefix, add_prefix: source path P is offered as add_prefix + P[len(strip_prefix):].
    step: the source run's step (default: its latest); 'checkpoint' only.

  Raises:
    ValueError: `select` matches nothing in the template; a selected param is missing from the
      source (names it); a shape differs (names the path and both shapes).
  """
  item_dir, roots = _locate_params(path, kind, step)
  if not (item_dir / '_METADATA').exists():
    raise FileNotFoundError(f'{item_dir} is not an Orbax pytree checkpoint (no _METADATA)')
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(item_dir)
    source = {}
    for src, entry in _source_params(getattr(meta, 'tree', meta), roots, item_dir).items():
      if strip_prefix and not src.startswith(strip_prefix):
        continue
      source[add_prefix + src[len(strip_prefix):]] = entry
    wanted = selected_paths(template, select)
    if not wanted:
      raise ValueError(f'select {select!r} matches no template param (modules: '
                       f'{sorted(template)[:10]})')
    item, restore_args = {}, {}
    for target in wanted:
      if target not in source:
        raise ValueError(f'param {target} (selected by {select!r}) is missing from {item_dir}')
      keys, saved = source[target]
      module, name = target.rsplit('/', 1)
      leaf = template[module][name]
      if tuple(saved.shape) != tuple(leaf.shape):
        raise ValueError(f'param {target}: shape {tuple(saved.shape)} in {item_dir}, '
                         f'{tuple(leaf.shape)} in the template')
      sharding = getattr(leaf, 'sharding', None)
      if sharding is not None:
        args = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
      else:
        args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
      node_i, node_a = item, restore_args
      for k in keys[:-1]:
        node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
      node_i[keys[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
      node_a[keys[-1]] = args
    restored = handler.restore(item_dir, args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  finally:
    handler.close()
  out = {m: dict(leaves) for m, leaves in template.items()}
  for target in wanted:
    node = restored
    for k in source[target][0]:
      node = node[k]
    module, name = target.rsplit('/', 1)
    out[module][name] = node
  return out


def apply_init_from(sources: Sequence[InitSource], params):
  """Loads every source into `params` in order; two sources selecting the same param raise."""
  claimed = {}
  for s in sources:
    for p in selected_paths(params, s.select):
      if p in claimed:
        raise ValueError(f'param {p} is selected by init_from sources {claimed[p]} and {s.path}')
      claimed[p] = s.path
    params = load_params_subset(s.path, s.select, params, kind=s.kind,
                                strip_prefix=s.strip_prefix, add_prefix=s.add_prefix)
  return params
