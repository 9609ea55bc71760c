"""Flamingo (stage 2) config.

    python -m flamingo_jax.summary --config configs/flamingo.py:size=80b
    python -m flamingo_jax.train --config configs/flamingo.py:size=smollm2 --workdir runs/flamingo

`size` is one of tiny | smollm2 | 3b | 9b | 80b (flamingo_jax/models/flamingo.py: SIZES).
"""
import ml_collections

from flamingo_jax.models import flamingo

# Trainable parameters (paper §2.4): resampler, gated xattn blocks, the new token rows. Everything else
# (NFNet, the LM's own weights) is frozen. Regexes over 'module/path/param'.
TRAINABLE = (
    r"^perceiver_resampler/",
    r"^lm/gated_xattn/",
    r"^lm/extra_(embed|unembed)/",
)


def get_config(arg: str = "size=smollm2") -> ml_collections.ConfigDict:
  args = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  unknown = set(args) - {"size"}
  if unknown:
    raise KeyError(f"Unknown config args {sorted(unknown)}; expected size=...")
  size = args.get("size", "smollm2")
  config = ml_collections.ConfigDict()
  config.model = flamingo.model_config(size)
  config.trainable = list(TRAINABLE)
  config.lock()
  return config
