"""TFDS builders over local files (no downloads): users' JSONL data and the embedded easy-VQA.

`make_builder(builder, data_dir, **config_kwargs)` constructs one by name; the classes are not put in
TFDS's global registry (`skip_registration`), so construct them here or directly, not with `tfds.load`.
Datasets are written in the `array_record` format, which the pipelines read by random access.
"""

from typing import Any

import tensorflow_datasets as tfds

from flamingo_jax.data.builders.common import InputError, JsonlConfig, jsonl_config
from flamingo_jax.data.builders.easy_vqa import EasyVqa, EasyVqaConfig, easy_vqa_config
from flamingo_jax.data.builders.jsonl import ImageTextJsonl, InterleavedJsonl, VideoTextJsonl

FILE_FORMAT = "array_record"

# name -> (builder class, function making its BuilderConfig from keyword arguments)
BUILDERS = {
  "easy_vqa": (EasyVqa, easy_vqa_config),
  "image_text_jsonl": (ImageTextJsonl, jsonl_config),
  "interleaved_jsonl": (InterleavedJsonl, jsonl_config),
  "video_text_jsonl": (VideoTextJsonl, jsonl_config),
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


def prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  """Builds the dataset into its data_dir unless already there (offline); returns the builder."""
  builder.download_and_prepare(file_format=FILE_FORMAT)
  return builder


__all__ = [
  "BUILDERS",
  "EasyVqa",
  "EasyVqaConfig",
  "FILE_FORMAT",
  "ImageTextJsonl",
  "InputError",
  "InterleavedJsonl",
  "JsonlConfig",
  "VideoTextJsonl",
  "easy_vqa_config",
  "jsonl_config",
  "make_builder",
  "prepare",
]
