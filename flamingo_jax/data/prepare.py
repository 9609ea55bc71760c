"""Entry point: build a config's datasets once, before training (`python -m flamingo_jax.data.prepare`).

    python -m flamingo_jax.data.prepare --config configs/contrastive.py:size=f6 \
        --config.data.data_dir=gs://BUCKET/tfds \
        --beam_options="--runner=DataflowRunner --project=P --region=R --temp_location=gs://BUCKET/tmp"

Each dataset of `config.data.datasets` is built into `config.data.data_dir` by its TFDS builder unless
it is already there. Builders that prepare on Apache Beam (webdataset shards) run on the runner that
`--beam_options` names ('' = DirectRunner in this process); the others run here. docs/DATA.md shows
each layout and the Dataflow set-up. Training configs with `data.prepare=False` (the paper's) expect
this to have run.
"""

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "A training config whose data section names the datasets.", lock_config=True
)
_BEAM_OPTIONS = flags.DEFINE_string(
  "beam_options", "", "Beam pipeline flags for the Beam builders ('' = DirectRunner, here)."
)
flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

  data = _CONFIG.value.data
  if data.source != "mixture":
    raise app.UsageError(f"config.data.source is {data.source!r}: only a 'mixture' has datasets to build")
  mixture.prepare_datasets(data, data.data_dir, beam_options=_BEAM_OPTIONS.value)
  for name in data.datasets:
    print(f"prepared {name} in {data.data_dir}")


if __name__ == "__main__":
  app.run(main)
