"""Parameter counts per component, from shapes only (`jax.eval_shape`: nothing is materialised).

python -m flamingo_jax.summary --config configs/flamingo.py:size=80b [--json]
"""

import json
import re

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from flamingo_jax.models import flamingo

# Component -> regex over '/'-joined parameter paths ('module/path/param').
COMPONENTS = (
  ("vision", r"^vision_encoder/"),
  ("resampler", r"^perceiver_resampler/"),
  ("xattn", r"^lm/gated_xattn/"),
  ("lm_extra_tokens", r"^lm/extra_(embed|unembed)/"),
  ("lm", r"^lm/"),
)


def flat_paths(params):
  """{'module/path/param': leaf} for a Haiku params tree."""
  return {f"{module}/{name}": leaf for module, d in params.items() for name, leaf in d.items()}


def count_by_component(params, trainable_patterns) -> dict:
  """Counts per component and trainable/frozen split (trainable = any of `trainable_patterns`)."""
  counts = {name: 0 for name, _ in COMPONENTS}
  trainable = frozen = 0
  for path, leaf in flat_paths(params).items():
    n = int(np.prod(leaf.shape))
    for name, pattern in COMPONENTS:
      if re.search(pattern, path):
        counts[name] += n
        break
    else:
      raise ValueError(f"Parameter {path} belongs to no component.")
    if any(re.search(p, path) for p in trainable_patterns):
      trainable += n
    else:
      frozen += n
  counts["total"] = trainable + frozen
  counts["trainable"], counts["frozen"] = trainable, frozen
  return counts


def main() -> None:
  """`python -m flamingo_jax.summary`; flags are defined here, not at import (other modules use --config)."""
  config_flag = config_flags.DEFINE_config_file("config", None, "Config file (configs/flamingo.py:size=...).")
  as_json = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")

  def _main(argv):
    del argv
    config = config_flag.value
    counts = count_by_component(flamingo.param_shapes(config.model), list(config.trainable))
    if as_json.value:
      print(json.dumps({"size": config.model.size, **counts}, indent=1))
      return
    print(f"Flamingo size={config.model.size}")
    for name, n in counts.items():
      print(f"  {name:16s} {n:>16,d}  ({n / 1e9:8.3f} B)")

  app.run(_main)


if __name__ == "__main__":
  main()
