"""Entry point: `python -m flamingo_jax.train --config configs/main_job.py --workdir DIR`.

Any config field can be overridden from the command line, e.g. `--config.optim.lr=3e-5`; an unknown key
is an error (the configs are locked). A checkpoint that cannot be read (with
`--config.train.checkpoint_fallback=False`) or saved ends the run with one line naming the step and the
file or cause, and exit status 1 (docs/TRAINING.md, "When things go wrong").
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, e.g. configs/flamingo.py:size=tiny.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, config).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.set_visible_devices([], "GPU")  # tf.data only; accelerators belong to JAX
  from flamingo_jax import checkpoint_errors  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import loop  # pylint: disable=g-import-not-at-top

  try:
    loop.train(_CONFIG.value, _WORKDIR.value)
  except (
    checkpoint_errors.CheckpointReadError,
    checkpoint_errors.CheckpointSaveError,
    checkpoint_errors.TemplateMismatchError,
    checkpoint_errors.NoReadableCheckpointError,
  ) as e:
    sys.exit(f"train: {e}")  # one line for the operator; the checkpoints are as the message says


if __name__ == "__main__":
  sys.exit(app.run(main))
