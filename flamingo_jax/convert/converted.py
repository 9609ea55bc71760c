"""The converter's output directory: an LM as an Orbax params checkpoint plus its config.

Layout (written under `DIR.tmp-*` and renamed into place when complete, so a crash never leaves a
half-written DIR):
  DIR/params/          Orbax StandardCheckpointer checkpoint of the Haiku-style LM params
                       (`lm/embed`, `lm/layers`, `lm/final_norm`[, `lm/unembed`]).
  DIR/lm_config.json   the LM config dict (`flamingo_jax.models.lm.LMConfig.from_dict`).
  DIR/source.json      where it came from (source spec, dtype).
`python -m flamingo_jax.convert` writes it; the LM spec `converted:DIR` reads it (`flamingo_jax/sources.py`).
"""

import json
import os
import shutil
import tempfile

import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"
CONFIG_FILE = "lm_config.json"
SOURCE_FILE = "source.json"


def save_converted(
  out: str, lm_config: dict, params: dict, source: dict | None = None, overwrite: bool = False
):
  """Writes `out/params` (Orbax), `out/lm_config.json` and `out/source.json` atomically.

  Raises:
    FileExistsError: `out` exists and `overwrite` is False.
  """
  out = os.path.abspath(out)
  if os.path.exists(out) and not overwrite:
    raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
  parent = os.path.dirname(out)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out) + ".tmp-", dir=parent)
  os.chmod(tmp, 0o755)  # mkdtemp makes it private (0700); the result is an ordinary directory.
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(os.path.join(tmp, PARAMS_DIR), params)
      checkpointer.wait_until_finished()
    with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
      json.dump(lm_config, f, indent=2, sort_keys=True)
    with open(os.path.join(tmp, SOURCE_FILE), "w") as f:
      json.dump(source or {}, f, indent=2, sort_keys=True)
    if os.path.exists(out):
      old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=parent)
      os.replace(out, os.path.join(old, "replaced"))
      os.replace(tmp, out)
      shutil.rmtree(old)
    else:
      os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def load_converted(directory: str) -> tuple[dict, dict]:
  """`(lm_config, params)` of a converted checkpoint; params as numpy arrays.

  Raises:
    FileNotFoundError: `directory` lacks `lm_config.json` or `params/`.
  """
  directory = os.path.abspath(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  params_path = os.path.join(directory, PARAMS_DIR)
  for path in (config_path, params_path):
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} is missing: not a converted LM checkpoint")
  with open(config_path) as f:
    lm_config = json.load(f)
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_path)
  params = {module: {name: np.asarray(w) for name, w in sub.items()} for module, sub in params.items()}
  return lm_config, params
