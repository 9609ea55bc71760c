"""Shared pieces of the TFDS builders over local files.

Every builder stores images as their *encoded file bytes* (PNG, JPEG, ...), never decoded at build
time: a corrupt, truncated or zero-byte image file is stored as it is, and a missing one as `b''` with
`*_missing = True`, so that building never fails on bad media. The input pipelines
(`flamingo_jax/data/preprocess.py`) decode them, and drop and count the bad ones per reason.

Structural input errors (bad JSON, a missing or mistyped field) raise `InputError` naming the file
and the 1-based line.

Paths inside a JSONL file are relative to the JSONL file's folder unless absolute (or a URL such as
`gs://...`, read through `etils.epath`).
"""

import dataclasses
import json
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

VERSION = "1.0.0"

# Encoded image bytes (one file), decoded by the pipeline, not by TFDS.
ENCODED_IMAGE = tfds.features.Tensor(shape=(), dtype=np.object_)
FLAG = tfds.features.Tensor(shape=(), dtype=np.bool_)
PATH = tfds.features.Text()


class InputError(ValueError):
  """A structural error in a builder's input file (names the file and the line)."""


def check_bad_files(bad: list[str], total: int, max_fraction: float, where: str) -> None:
  """Logs each bad source file ('path (reason)'); raises InputError naming the first few when more
  than `max_fraction` of the `total` files are bad (a broken source, not a stray file)."""
  if not bad:
    return
  for b in bad:
    logging.warning("%s: dropped a source file that does not decode: %s", where, b)
  logging.warning("%s: dropped %d of %d source files", where, len(bad), total)
  if len(bad) > max_fraction * total:
    raise InputError(
      f"{where}: {len(bad)} of {total} source files do not decode (more than "
      f"max_bad_fraction={max_fraction:g}); the first: {bad[:5]}"
    )


@dataclasses.dataclass(eq=False)
class JsonlConfig(tfds.core.BuilderConfig):
  """Config of the JSONL builders: which JSONL file holds each split.

  Attributes:
    sources: `{split: path}` to a JSONL file per split (e.g. `{'train': '/data/pairs.jsonl'}`).
      TFDS caches a prepared dataset by `name`: use a new `name` when the sources change.
  """

  sources: Mapping[str, str] | None = None


def jsonl_config(name: str, sources: str | Mapping[str, str]) -> JsonlConfig:
  """A `JsonlConfig`; a single path means `{'train': path}`."""
  if isinstance(sources, (str, epath.Path)) or hasattr(sources, "__fspath__"):
    sources = {"train": str(sources)}
  return JsonlConfig(
    name=name,
    sources={str(k): str(v) for k, v in dict(sources).items()},
    description=f"JSONL sources {dict(sources)}",
  )


def split_sources(builder: tfds.core.GeneratorBasedBuilder) -> dict[str, epath.Path]:
  """`{split: JSONL path}` of a builder's `JsonlConfig`, checked to exist."""
  config = builder.builder_config
  if not isinstance(config, JsonlConfig) or not config.sources:
    raise ValueError(f"{builder.name}: pass config=jsonl_config(name, {{split: path}}); got {config!r}")
  out = {}
  for split, path in config.sources.items():
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(f"{builder.name}/{config.name}: JSONL for split {split!r} not found: {path}")
    out[split] = path
  return out


def read_jsonl(path: epath.Path) -> Iterator[tuple[int, dict[str, Any]]]:
  """Yields `(line_number, record)` for each non-blank line (1-based numbers)."""
  with path.open("r") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise InputError(f"{path}:{line_no}: invalid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict):
        raise InputError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
      yield line_no, record


def field(record: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
  """`record[key]`, checked to be present and of type `kind`; `where` is 'file:line'."""
  if key not in record:
    raise InputError(f"{where}: missing field {key!r} (fields: {sorted(record)})")
  value = record[key]
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    names = "/".join(k.__name__ for k in kinds)
    raise InputError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
  return value


def string_list(record: Mapping[str, Any], key: str, where: str) -> list[str]:
  """`record[key]` as a list of strings."""
  values = field(record, key, list, where)
  for i, v in enumerate(values):
    if not isinstance(v, str):
      raise InputError(f"{where}: {key}[{i}] must be a string, got {type(v).__name__}")
  return values


def resolve(path: str, base: epath.Path) -> epath.Path:
  """`path` if absolute or a URL, else relative to the folder `base`."""
  if "://" in path or path.startswith("/"):
    return epath.Path(path)
  return base / path


def read_media(path: epath.Path) -> tuple[bytes, bool]:
  """`(file bytes, missing)`; a file that cannot be read gives `(b'', True)` (dropped later)."""
  try:
    return path.read_bytes(), False
  except (OSError, ValueError):  # missing file, a folder, no permission
    return b"", True


def image_features() -> dict[str, tfds.features.FeatureConnector]:
  """One image: encoded bytes, its source path (for logs), whether the file was missing."""
  return {"image": ENCODED_IMAGE, "image_path": PATH, "image_missing": FLAG}


def image_list_features(prefix: str) -> dict[str, tfds.features.FeatureConnector]:
  """A list of images: `{prefix}s`, `{prefix}_paths`, `{prefix}_missing` (parallel sequences)."""
  return {
    f"{prefix}s": tfds.features.Sequence(ENCODED_IMAGE),
    f"{prefix}_paths": tfds.features.Sequence(PATH),
    f"{prefix}_missing": tfds.features.Sequence(FLAG),
  }


def read_image_list(paths: list[str], base: epath.Path, prefix: str) -> dict[str, list]:
  """The features of `image_list_features(prefix)` for files `paths` (relative to `base`)."""
  data, missing = [], []
  for p in paths:
    b, m = read_media(resolve(p, base))
    data.append(b)
    missing.append(m)
  return {f"{prefix}s": data, f"{prefix}_paths": list(paths), f"{prefix}_missing": missing}
