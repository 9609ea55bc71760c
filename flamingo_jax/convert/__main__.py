"""Converts a pretrained decoder LM into an Orbax params checkpoint for `init_from`.

  python -m flamingo_jax.convert --from smollm2 --out /tmp/smollm2
  python -m flamingo_jax.convert --from gguf:/path/model.gguf --out DIR [--dtype bfloat16]
  python -m flamingo_jax.convert --from hf:/path/hf_checkpoint_dir --out DIR

The output layout is `flamingo_jax/convert/converted.py`'s; use it as `init_from.lm=converted:DIR`.
"""

import argparse
import sys

from flamingo_jax import sources
from flamingo_jax.convert import converted
from flamingo_jax.models import flamingo


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
    help=f"the LM: {sources.LM_SPECS}",
  )
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--dtype", default="float32", choices=sorted(flamingo.DTYPES))
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  args = parser.parse_args(argv)
  lm_config, params = sources.load_lm(args.source, flamingo.DTYPES[args.dtype])
  converted.save_converted(
    args.out, lm_config, params, {"from": args.source, "dtype": args.dtype}, overwrite=args.overwrite
  )
  n = sum(w.size for sub in params.values() for w in sub.values())
  print(f"wrote {args.out}: {n:,} parameters ({args.dtype}), config {lm_config}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
