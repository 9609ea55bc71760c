"""The converter's output directory: an LM, or a whole Flamingo, as an Orbax params checkpoint plus
its config.

Layout (written under `DIR.tmp-*` and renamed into place when complete, so a crash never leaves a
half-written DIR):
  DIR/params/          Orbax StandardCheckpointer checkpoint of the Haiku-style params: the LM's
                       (`lm/embed`, `lm/layers`, `lm/final_norm`[, `lm/unembed`]) or a whole
                       Flamingo's (also `vision_encoder/`, `perceiver_resampler/`, `lm/gated_xattn`,
                       `lm/extra_*`).
  DIR/lm_config.json   the LM config dict (`flamingo_jax.models.lm.LMConfig.from_dict`).
  DIR/config.json      a whole Flamingo only: {'model': the model config, 'tokenizer': its spec,
                       'init_from': ..., 'data': {'source': 'converted'}}, read like a run's own
                       config.json by `evaluate` and `generate` (`--workdir DIR`) and by
                       `configs/pretrained.py:dir=DIR` for fine-tuning.
  DIR/tokenizer.json (+ tokenizer_config.json)  the source's tokenizer, where it has one.
  DIR/source.json      where it came from (source spec, dtype).
`python -m flamingo_jax.convert` writes it; the LM spec `converted:DIR` reads its LM
(`flamingo_jax/sources.py`), `init_from` its other parts.
"""

import json
import os
import shutil
import tempfile

import numpy as np
import orbax.checkpoint as ocp
from etils import epath

PARAMS_DIR = "params"
CONFIG_FILE = "lm_config.json"
SOURCE_FILE = "source.json"


RUN_CONFIG_FILE = "config.json"
# The Flamingo tree's modules that hold the LM's own weights: what the LM spec `converted:DIR` reads.
LM_MODULES = ("lm/embed", "lm/layers", "lm/final_norm", "lm/unembed")


def save_converted(
  out: str,
  lm_config: dict,
  params: dict,
  source: dict | None = None,
  overwrite: bool = False,
  run_config: dict | None = None,
  files: dict[str, bytes] | None = None,
):
  """Writes `out/params` (Orbax), `out/lm_config.json`, `out/source.json` and, for a whole model,
  `out/config.json` (`run_config`) and `files` ({name in out: content}) atomically.

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
    if run_config is not None:
      with open(os.path.join(tmp, RUN_CONFIG_FILE), "w") as f:
        json.dump(run_config, f, indent=2, sort_keys=True)
    for name, content in (files or {}).items():
      with open(os.path.join(tmp, name), "wb") as f:
        f.write(content)
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
  """`(lm_config, params)` of a converted checkpoint (a local path or a bucket, gs://...): the LM's
  modules only, as numpy arrays.

  Raises:
    FileNotFoundError: `directory` lacks `lm_config.json` or `params/`.
  """
  root = epath.Path(directory) if "://" in str(directory) else epath.Path(os.path.abspath(directory))
  config_path, params_path = root / CONFIG_FILE, root / PARAMS_DIR
  for path in (config_path, params_path):
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: not a converted LM checkpoint")
  lm_config = json.loads(config_path.read_text())
  with ocp.StandardCheckpointer() as checkpointer:
    params = checkpointer.restore(params_path)
  params = {
    module: {name: np.asarray(w) for name, w in sub.items()}
    for module, sub in params.items()
    if module in LM_MODULES
  }
  return lm_config, params
