"""Image-text pairs from img2dataset webdataset shards (LAION, COYO, DataComp, CC12M), prepared on Beam.

A shard is a tar file whose members are grouped by *key*, the member name up to its first dot after the
last '/': `00001.jpg`, `00001.txt`, `00001.json` are one record. A record needs one image member
(`IMAGE_EXTENSIONS`) and a `.txt` caption; other members (`.json`, ...) are ignored.

The preparation is an Apache Beam pipeline (`beam.Create(shards) | FlatMap(read one shard)`): TFDS runs
it on the runner of its `DownloadConfig` (`beam_runner=` or `beam_options=`), DirectRunner on one
machine and Dataflow, Spark or Flink at scale, with no other change (docs/DATA.md). Output is
ArrayRecord, read by random access like every other builder. Images are stored as their encoded bytes,
never decoded here (`common.py`); the input pipeline decodes them and counts the undecodable ones.

Bad records are dropped and counted per cause in Beam counters, then in `info.metadata['dropped']`:
  missing_image      a key with a caption but no image member
  missing_text       a key with an image but no `.txt` member
  empty_text         a caption that is blank
  unsupported_image  an image member whose extension is not an image format we read
  duplicate_key      a key seen twice in one shard (the first is kept)
  unreadable_member  a member the tar reader cannot extract
A shard whose bad records exceed `max_bad_fraction` of its records (a broken source, not a stray
record), or that is not a readable tar file, stops the build with an `InputError` naming the shard
and its first bad key. Record keys are '<shard file name>/<key>', unique across shards of a split.
Requires the `data` extra (`pip install -e .[data]`: apache-beam).
"""

import dataclasses
import os
import tarfile
from collections.abc import Iterator, Mapping

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from flamingo_jax.data.builders import common

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Members img2dataset writes beside the image that are not images.
NON_IMAGE_EXTENSIONS = ("txt", "json", "cls", "npy", "parquet")
CAUSES = (
  "missing_image",
  "missing_text",
  "empty_text",
  "unsupported_image",
  "duplicate_key",
  "unreadable_member",
)
COUNTER_NAMESPACE = "webdataset"


@dataclasses.dataclass(eq=False)
class WebdatasetConfig(tfds.core.BuilderConfig):
  """sources: `{split: (tar paths or glob patterns, ...)}`; max_bad_fraction: bad records allowed per shard."""

  sources: Mapping[str, tuple[str, ...]] | None = None
  max_bad_fraction: float = 0.05


def webdataset_config(
  name: str, sources: str | list[str] | Mapping[str, list[str] | str], max_bad_fraction: float = 0.05
) -> WebdatasetConfig:
  """A `WebdatasetConfig`; a pattern or a list of them means `{'train': ...}`; a pattern may hold
  several, ','-separated (e.g. from the command line)."""
  if not isinstance(sources, Mapping):
    sources = {"train": sources}

  def patterns(v):
    return tuple(p for p in v.split(",") if p) if isinstance(v, str) else tuple(str(p) for p in v)

  as_tuple = {str(k): patterns(v) for k, v in sources.items()}
  return WebdatasetConfig(
    name=name,
    sources=as_tuple,
    max_bad_fraction=float(max_bad_fraction),
    description=f"webdataset shards {as_tuple}",
  )


def expand_shards(patterns: tuple[str, ...], where: str) -> list[str]:
  """The sorted shard files matched by `patterns`; an unmatched pattern is an error naming it."""
  files = []
  for pattern in patterns:
    path = epath.Path(pattern)
    matched = (
      sorted(str(p) for p in path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else []
    )
    if not matched and path.exists():
      matched = [str(path)]
    if not matched:
      raise FileNotFoundError(f"{where}: no shard matches {pattern}")
    files += matched
  return sorted(set(files))


def split_key(member_name: str) -> tuple[str, str]:
  """('dir/00001', 'jpg') of 'dir/00001.jpg' (webdataset: the extension starts at the basename's first dot)."""
  folder, base = os.path.split(member_name)
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_shard(path: str) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], int]:
  """(records [(key, features)], bad [(cause, key)], number of keys) of one shard.

  Raises InputError naming the shard when it is not a readable tar file."""
  members: dict[str, dict[str, bytes]] = {}
  bad: list[tuple[str, str]] = []
  order: list[str] = []
  try:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = split_key(member.name)
        if key not in members:
          members[key] = {}
          order.append(key)
        if ext in members[key]:
          bad.append(("duplicate_key", key))
          continue
        try:
          members[key][ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
          bad.append(("unreadable_member", f"{member.name} ({type(e).__name__})"))
          members[key][ext] = None
  except (tarfile.TarError, OSError, EOFError) as e:
    raise common.InputError(
      f"webdataset shard {path}: not a readable tar file ({type(e).__name__}: {e})"
    ) from None
  records = []
  shard = os.path.basename(path)
  for key in order:
    parts = members[key]
    if any(v is None for v in parts.values()):
      continue  # counted as unreadable_member
    images = [e for e in parts if e in IMAGE_EXTENSIONS]
    others = [e for e in parts if e not in IMAGE_EXTENSIONS and e not in NON_IMAGE_EXTENSIONS]
    if not images:
      bad.append(("unsupported_image" if others else "missing_image", key))
      continue
    if "txt" not in parts:
      bad.append(("missing_text", key))
      continue
    text = parts["txt"].decode("utf-8", errors="replace").strip()
    if not text:
      bad.append(("empty_text", key))
      continue
    image = parts[images[0]]
    records.append(
      (
        f"{shard}/{key}",
        {"image": image, "image_path": f"{path}:{key}.{images[0]}", "image_missing": False, "text": text},
      )
    )
  return records, bad, len(order)


def shard_examples(path: str, max_bad_fraction: float) -> Iterator[tuple[str, dict]]:
  """The records of one shard for Beam, counting each bad one under its cause; raises past the bound."""
  from apache_beam import metrics  # pylint: disable=g-import-not-at-top  (the `data` extra)

  records, bad, keys = read_shard(path)
  for cause, _ in bad:
    metrics.Metrics.counter(COUNTER_NAMESPACE, cause).inc()
  metrics.Metrics.counter(COUNTER_NAMESPACE, "records").inc(len(records))
  if bad and len(bad) > max_bad_fraction * max(keys, 1):
    cause, key = bad[0]
    raise common.InputError(
      f"webdataset shard {path}: {len(bad)} bad of {keys} records (more than max_bad_fraction="
      f"{max_bad_fraction:g}); the first: {key} ({cause})"
    )
  yield from records


class ImageTextWebdataset(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Image-text pairs from webdataset tar shards, prepared by a Beam pipeline (module docstring)."""

  VERSION = tfds.core.Version(common.VERSION)
  USES_BEAM = True  # `builders.prepare` gives it a Beam runner

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description="Image-text pairs from img2dataset webdataset shards.",
      features=tfds.features.FeaturesDict({**common.image_features(), "text": tfds.features.Text()}),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local or gs:// shards only
    config = self.builder_config
    if not isinstance(config, WebdatasetConfig) or not config.sources:
      raise ValueError(f"{self.name}: pass config=webdataset_config(name, {{split: shards}}); got {config!r}")
    where = f"{self.name}/{config.name}"
    return {split: self._generate_examples(expand_shards(p, where)) for split, p in config.sources.items()}

  def _generate_examples(self, shards: list[str]):
    beam = tfds.core.lazy_imports.apache_beam
    bound = self.builder_config.max_bad_fraction
    return beam.Create(shards) | beam.FlatMap(shard_examples, bound)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Beam's counters -> `info.metadata['dropped']` ({cause: count}) and `['records']`, and a log line."""
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top

    found = pipeline_result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]
    totals = {}
    for counter in found:
      totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    self.info.metadata["records"] = int(totals.pop("records", 0))
    dropped = {cause: int(totals.get(cause, 0)) for cause in CAUSES}
    self.info.metadata["dropped"] = dropped
    if any(dropped.values()):
      logging.warning("%s/%s: dropped records %s", self.name, self.builder_config.name, dropped)
