"""Parameters from elsewhere (`config.init_from`): the one path by which a run starts from weights.

`initial_params` swaps the sources of `config.init_from` into freshly initialised params:
  lm        a pretrained LM spec (`smollm2`, `gguf:`, `hf:`, `converted:`; `flamingo_jax/pretrained.py`),
            whose own config must equal `config.model.lm` (every differing field is named);
  vision    another run (stage 1) or a params-only save: its `vision_encoder/` params;
  flamingo  a Flamingo run or a converted Flamingo checkpoint: its trained parts (resampler, gated
            xattn blocks, the new token rows), to fine-tune or continue on another mixture.
The training loop resumes from its own workdir first (`flamingo_jax/train/loop.py`): this workdir's
newest checkpoint > `init_from` > fresh.

Params paths are Haiku's 'module/name' strings (see docs/ARCHITECTURE.md). Only the selected arrays
are read (Orbax partial restore), each onto its template leaf's dtype and sharding.
"""

import re
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from flamingo_jax.checkpoint import CHECKPOINTS_DIR, STATE, absolute_path
from flamingo_jax.checkpoint import step_dir as _step_dir

# flamingo_jax/convert/__main__.py writes DIR/params (StandardCheckpointer) + DIR/lm_config.json.
CONVERTED_PARAMS_DIR = "params"
SOURCE_KINDS = ("params", "checkpoint")
# What each `config.init_from` key loads (regex over 'module/name'; `lm` goes through pretrained.py).
VISION_PARAMS = r"^vision_encoder/"
FLAMINGO_PARAMS = r"^(perceiver_resampler/|lm/gated_xattn/|lm/extra_(embed|unembed)/)"


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
  strip_prefix: str = ""
  add_prefix: str = ""

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "InitSource":
    d = dict(d)
    unknown = sorted(set(d) - set(cls._fields))
    missing = sorted({"path", "kind", "select"} - set(d))
    if unknown or missing:
      raise ValueError(
        f"init_from source {d}: unknown keys {unknown}, missing keys {missing} (keys: {cls._fields})"
      )
    if d["kind"] not in SOURCE_KINDS:
      raise ValueError(f"init_from source {d}: kind must be one of {SOURCE_KINDS}")
    re.compile(d["select"])
    return cls(**{k: str(v) for k, v in d.items()})


def is_converted(path) -> bool:
  """Whether `path` is a whole model written by `python -m flamingo_jax.convert` (params/ and
  config.json, no checkpoints/): `evaluate` and `generate` read it as a run at step 0."""
  p = absolute_path(path)
  return (
    (p / CONVERTED_PARAMS_DIR).exists()
    and (p / "config.json").exists()
    and not (p / CHECKPOINTS_DIR).exists()
  )


def _locate_params(path, kind: str | None, step: int | None):
  """(pytree item directory, roots: key tuples of the {module: {name: array}} trees in it)."""
  p = absolute_path(path)
  if not p.exists():
    raise FileNotFoundError(f"params source {p} does not exist")
  run_root = p / CHECKPOINTS_DIR if (p / CHECKPOINTS_DIR).exists() else p
  if kind is None:
    is_run = (p / STATE).exists() or _step_dir(run_root) is not None
    kind = "checkpoint" if is_run else "params"
  if kind == "checkpoint":
    if (p / STATE).exists() and step is None:  # a step directory
      return p / STATE, None
    step_dir = _step_dir(run_root, step)
    if step_dir is None:
      raise FileNotFoundError(f"no complete checkpoint under {run_root}")
    return step_dir / STATE, None
  if kind == "params":
    item = p / CONVERTED_PARAMS_DIR if (p / CONVERTED_PARAMS_DIR).exists() else p
    return item, ((),)
  raise ValueError(f"kind must be one of {SOURCE_KINDS} or None, got {kind!r}")


def _source_params(tree, roots, where) -> dict[str, tuple[tuple, Any]]:
  """{'module/name': (key tuple in the saved tree, array metadata)}."""
  if roots is None:  # a train state: its trainable and frozen params (or a bare params tree)
    roots = tuple((k,) for k in ("params", "frozen") if isinstance(tree.get(k), Mapping))
    roots = roots or ((),)
  out = {}
  for root in roots:
    sub = tree
    for k in root:
      sub = sub[k]
    for module, leaves in sub.items():
      if not isinstance(leaves, Mapping):
        raise ValueError(
          f"{where}: {'/'.join(root + (module,))} is not a Haiku params tree {{module: {{name: array}}}}"
        )
      for name, meta in leaves.items():
        key = f"{module}/{name}"
        if key in out:
          raise ValueError(f"{where}: param {key} appears twice (in {out[key][0][:-2]} and {root})")
        out[key] = (root + (module, name), meta)
  return out


def selected_paths(template, select: str) -> list[str]:
  """The 'module/name' paths of a Haiku params tree that the regex `select` matches (re.search)."""
  pattern = re.compile(select)
  return [f"{m}/{n}" for m, leaves in template.items() for n in leaves if pattern.search(f"{m}/{n}")]


def load_params_subset(
  path,
  select: str,
  template,
  *,
  kind: str | None = None,
  strip_prefix: str = "",
  add_prefix: str = "",
  step: int | None = None,
):
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

  Long: one partial Orbax restore (locate, match, check shapes, restore, reassemble).
  """
  item_dir, roots = _locate_params(path, kind, step)
  if not (item_dir / "_METADATA").exists():
    raise FileNotFoundError(f"{item_dir} is not an Orbax pytree checkpoint (no _METADATA)")
  handler = ocp.PyTreeCheckpointHandler()
  try:
    meta = handler.metadata(item_dir)
    source = {}
    for src, entry in _source_params(getattr(meta, "tree", meta), roots, item_dir).items():
      if strip_prefix and not src.startswith(strip_prefix):
        continue
      source[add_prefix + src[len(strip_prefix) :]] = entry
    wanted = selected_paths(template, select)
    if not wanted:
      raise ValueError(f"select {select!r} matches no template param (modules: {sorted(template)[:10]})")
    item, restore_args = {}, {}
    for target in wanted:
      if target not in source:
        raise ValueError(f"param {target} (selected by {select!r}) is missing from {item_dir}")
      keys, saved = source[target]
      module, name = target.rsplit("/", 1)
      leaf = template[module][name]
      if tuple(saved.shape) != tuple(leaf.shape):
        raise ValueError(
          f"param {target}: shape {tuple(saved.shape)} in {item_dir}, {tuple(leaf.shape)} in the template"
        )
      sharding = getattr(leaf, "sharding", None)
      if sharding is not None:
        args = ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape, dtype=leaf.dtype)
      else:
        args = ocp.RestoreArgs(restore_type=np.ndarray, dtype=leaf.dtype)
      node_i, node_a = item, restore_args
      for k in keys[:-1]:
        node_i, node_a = node_i.setdefault(k, {}), node_a.setdefault(k, {})
      node_i[keys[-1]] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
      node_a[keys[-1]] = args
    restored = handler.restore(
      item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
    )
  finally:
    handler.close()
  out = {m: dict(leaves) for m, leaves in template.items()}
  for target in wanted:
    node = restored
    for k in source[target][0]:
      node = node[k]
    module, name = target.rsplit("/", 1)
    out[module][name] = node
  return out


def apply_init_from(sources: Sequence[InitSource], params):
  """Loads every source into `params` in order; two sources selecting the same param raise."""
  claimed = {}
  for s in sources:
    for p in selected_paths(params, s.select):
      if p in claimed:
        raise ValueError(f"param {p} is selected by init_from sources {claimed[p]} and {s.path}")
      claimed[p] = s.path
    params = load_params_subset(
      s.path, s.select, params, kind=s.kind, strip_prefix=s.strip_prefix, add_prefix=s.add_prefix
    )
    logging.info("init_from %s: %s", s.path, s.select)
  return params


def initial_params(init_from, model_cfg, params, *, end_id: int | None = None):
  """`params` (a fresh init, numpy) with the sources of `init_from` (lm, vision, flamingo) swapped in.

  With LM weights and the tokenizer's end id, the new token rows start from the LM's own rows
  (`pretrained.init_new_token_rows`), unless a `flamingo` source brings trained ones.

  Raises:
    ValueError: the LM source's config differs from `model_cfg.lm` (each field named); a selected
      param missing from a source or of another shape (named); two sources claiming one param.
    FileNotFoundError: a source that does not exist.
  """
  if init_from.lm:
    from flamingo_jax import pretrained, sources  # pylint: disable=g-import-not-at-top

    source = f"init_from.lm {init_from.lm!r}"
    source_config, lm_params = sources.load_lm(init_from.lm, np.float32)
    params = pretrained.merge_lm_params(
      params,
      lm_params,
      source_config=source_config,
      model_lm_config=pretrained.lm_config_dict(model_cfg),
      source=source,
    )
    if end_id is not None and "lm/extra_embed" in params:
      params = pretrained.init_new_token_rows(params, end_id)
  kind = lambda path: "params" if is_converted(path) else "checkpoint"  # noqa: E731
  sources = [InitSource(init_from.vision, kind(init_from.vision), VISION_PARAMS)] if init_from.vision else []
  if init_from.flamingo:
    sources.append(InitSource(init_from.flamingo, kind(init_from.flamingo), FLAMINGO_PARAMS))
  return apply_init_from(sources, params)
