"""TFDS builders over local files (no downloads): users' JSONL data and the embedded easy-VQA.

`make_builder(builder, data_dir, **config_kwargs)` constructs one by name; the classes are not put in
TFDS's global registry (`skip_registration`), so construct them here or directly, not with `tfds.load`.
Datasets are written in the `array_record` format, which the pipelines read by random access.
"""

import shlex
from typing import Any

import tensorflow_datasets as tfds

from flamingo_jax.data.builders.beam import BeamBuilder, BeamSourcesConfig, beam_config
from flamingo_jax.data.builders.common import InputError, JsonlConfig, jsonl_config
from flamingo_jax.data.builders.easy_vqa import EasyVqa, EasyVqaConfig, easy_vqa_config
from flamingo_jax.data.builders.jsonl import ImageTextJsonl, InterleavedJsonl, VideoTextJsonl
from flamingo_jax.data.builders.mmc4 import InterleavedMmc4
from flamingo_jax.data.builders.parquet import InterleavedParquet
from flamingo_jax.data.builders.video_mp4 import VideoTextMp4
from flamingo_jax.data.builders.webdataset import ImageTextWebdataset

FILE_FORMAT = "array_record"

# name -> (builder class, function making its BuilderConfig from keyword arguments)
BUILDERS = {
  "easy_vqa": (EasyVqa, easy_vqa_config),
  "image_text_jsonl": (ImageTextJsonl, jsonl_config),
  "interleaved_jsonl": (InterleavedJsonl, jsonl_config),
  "video_text_jsonl": (VideoTextJsonl, jsonl_config),
  # Prepared on Apache Beam (the `data` extra; docs/DATA.md).
  "image_text_webdataset": (ImageTextWebdataset, beam_config),
  "interleaved_parquet": (InterleavedParquet, beam_config),
  "interleaved_mmc4": (InterleavedMmc4, beam_config),
  "video_text_mp4": (VideoTextMp4, beam_config),
}


def make_builder(builder: str, data_dir: str, /, **config_kwargs: Any) -> tfds.core.DatasetBuilder:
  """The builder named `builder` (a key of BUILDERS) with its config made from `config_kwargs`.

  E.g. `make_builder('easy_vqa', d, kind='captions', max_examples=64)` or
  `make_builder('image_text_jsonl', d, name='my_pairs', sources={'train': '/data/pairs.jsonl'})`.
  """
  if builder not in BUILDERS:
    raise KeyError(f"unknown builder {builder!r}; expected one of {sorted(BUILDERS)}")
  cls, make_config = BUILDERS[builder]
  try:
    config = make_config(**config_kwargs)
  except TypeError as e:
    raise TypeError(f"builder {builder!r}: bad config arguments {sorted(config_kwargs)}: {e}") from None
  if config.name in cls.builder_configs:  # TFDS refuses a new object named like a predefined one
    config = config.name  # (same name = same fields: names encode them)
  return cls(config=config, data_dir=data_dir, file_format=FILE_FORMAT)


def prepare(builder: tfds.core.DatasetBuilder, beam_options: str = "") -> tfds.core.DatasetBuilder:
  """Builds the dataset into its data_dir unless already there (offline); returns the builder.

  beam_options: Beam pipeline flags for the builders that prepare on Beam, e.g.
  '--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp' ('' = DirectRunner, in
  this process). Builders that do not use Beam ignore it.
  """
  config = None
  if isinstance(builder, BeamBuilder):
    import apache_beam as beam  # pylint: disable=g-import-not-at-top  (the `data` extra)

    # Explicit flags: Beam would otherwise parse this process's command line as pipeline options.
    options = beam.options.pipeline_options.PipelineOptions(flags=shlex.split(beam_options))
    runner = None if beam_options else beam.runners.DirectRunner()
    config = tfds.download.DownloadConfig(beam_options=options, beam_runner=runner)
  builder.download_and_prepare(file_format=FILE_FORMAT, download_config=config)
  return builder


__all__ = [
  "BUILDERS",
  "BeamBuilder",
  "BeamSourcesConfig",
  "EasyVqa",
  "EasyVqaConfig",
  "FILE_FORMAT",
  "ImageTextJsonl",
  "InputError",
  "ImageTextWebdataset",
  "InterleavedJsonl",
  "InterleavedMmc4",
  "InterleavedParquet",
  "JsonlConfig",
  "VideoTextJsonl",
  "VideoTextMp4",
  "beam_config",
  "easy_vqa_config",
  "jsonl_config",
  "make_builder",
  "prepare",
]
