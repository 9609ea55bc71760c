"""Converts pretrained weights into an Orbax params checkpoint (`flamingo_jax/convert/converted.py`).

A frozen LM, for `init_from.lm=converted:DIR`:
  python -m flamingo_jax.convert --from smollm2 --out /tmp/smollm2
  python -m flamingo_jax.convert --from gguf:/path/model.gguf --out DIR [--dtype bfloat16]
  python -m flamingo_jax.convert --from hf:/path/hf_checkpoint_dir --out DIR

A whole public Flamingo-family model (docs/PRETRAINED.md), for `evaluate --workdir DIR` and
`configs/pretrained.py:dir=DIR`:
  python -m flamingo_jax.convert --from open_flamingo:checkpoint.pt --lm MPT_OR_LLAMA_HF_DIR \\
      --vision open_clip_vit_l14.safetensors --vision_variant ViT-L/14 --every 4 --out DIR
  python -m flamingo_jax.convert --from idefics:IDEFICS_HF_DIR --out DIR
"""

import argparse
import json
import os
import sys

from flamingo_jax import sources
from flamingo_jax.convert import converted
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import flamingo

WHOLE_MODELS = ("open_flamingo", "idefics")
# Each source's own names of the project's `<image>` and `<EOC>` (whose rows the converters fill).
TOKEN_ALIASES = {
  "open_flamingo": {"<|endofchunk|>": "<EOC>"},
  "idefics": {"<fake_token_around_image>": "<EOC>"},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _whole_model(args, dtype):
  """(model ConfigDict, params, directory holding the source's tokenizer files)."""
  kind, _, path = args.source.partition(":")
  if kind == "open_flamingo":
    from flamingo_jax.convert import open_flamingo  # pylint: disable=g-import-not-at-top

    missing = [f"--{k}" for k in ("lm", "vision", "vision_variant", "every") if not getattr(args, k)]
    if missing:
      raise SystemExit(f"--from open_flamingo:... needs {', '.join(missing)}")
    cfg, params = open_flamingo.convert_checkpoint(
      path, args.lm, args.vision, vision_variant=args.vision_variant, every=args.every, dtype=dtype
    )
    return cfg, params, args.lm
  from flamingo_jax.convert import idefics  # pylint: disable=g-import-not-at-top

  cfg, params = idefics.convert_directory(path, dtype)
  return cfg, params, path


def _tokenizer_files(directory: str, vocab_size: int, family: str) -> dict[str, bytes]:
  """The source's tokenizer files, as the project's `Tokenizer` reads a converted model's: without the
  source's own new tokens (appended again as `<image>`, `<EOC>`), with the source's names of them as
  aliases."""
  files = {}
  for name in TOKENIZER_FILES:
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path, "rb") as f:
        files[name] = f.read()
  if "tokenizer.json" in files:
    files["tokenizer.json"] = tokenizer_lib.original_vocabulary(files["tokenizer.json"], vocab_size)
  if "tokenizer_config.json" in files:
    hf = json.loads(files["tokenizer_config.json"])
    hf[tokenizer_lib.ALIASES_KEY] = TOKEN_ALIASES[family]
    files["tokenizer_config.json"] = json.dumps(hf, indent=2).encode()
  return files


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
    help=f"an LM: {sources.LM_SPECS}; or a whole model: open_flamingo:CHECKPOINT or idefics:HF_DIR",
  )
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--dtype", default="float32", choices=sorted(flamingo.DTYPES))
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
  parser.add_argument("--lm", default="", help="open_flamingo: the LM's HF directory")
  parser.add_argument("--vision", default="", help="open_flamingo: open_clip vision weights")
  parser.add_argument("--vision_variant", default="", help="open_flamingo: e.g. ViT-L/14")
  parser.add_argument("--every", type=int, default=0, help="open_flamingo: cross_attn_every_n_layers")
  args = parser.parse_args(argv)
  dtype = flamingo.DTYPES[args.dtype]
  if os.path.exists(args.out) and not args.overwrite:  # before the slow reading
    raise FileExistsError(f"{args.out} exists (pass --overwrite to replace it)")
  source = {"from": args.source, "dtype": args.dtype}
  family = args.source.partition(":")[0]
  if family in WHOLE_MODELS:
    model_cfg, params, tokenizer_dir = _whole_model(args, dtype)
    # The LM's weights' description (how attention is computed is the run's choice, not the source's).
    lm_config = {
      k: v for k, v in model_cfg.lm.to_dict().items() if k not in ("num_extra_tokens", "attention")
    }
    files = _tokenizer_files(tokenizer_dir, model_cfg.lm.vocab_size, family)
    out = os.path.abspath(args.out)
    tokenizer = f"hf:{os.path.join(out, 'tokenizer.json')}" if "tokenizer.json" in files else ""
    run_config = dict(
      model=model_cfg.to_dict(),
      tokenizer=tokenizer,
      init_from=dict(lm=f"converted:{out}", vision=out, flamingo=out),
      data=dict(source="converted"),
      prompt_format=family,  # prompting.FORMATS: each family's own prompts
    )
    converted.save_converted(
      out, lm_config, params, dict(source, lm=args.lm, vision=args.vision), args.overwrite, run_config, files
    )
  else:
    lm_config, params = sources.load_lm(args.source, dtype)
    converted.save_converted(args.out, lm_config, params, source, overwrite=args.overwrite)
  n = sum(w.size for sub in params.values() for w in sub.values())
  print(f"wrote {args.out}: {n:,} parameters ({args.dtype})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
