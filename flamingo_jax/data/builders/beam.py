"""The builders prepared on Apache Beam: one source file is one unit of work, bad records are counted.

A subclass names its features, its drop `CAUSES`, and a pure `read_source(path)` that returns
`(records [(key, features)], bad [(cause, key)], number of records in the file)`. The Beam pipeline is
`beam.Create(files) | FlatMap(read one file)`: TFDS runs it on the runner of its `DownloadConfig`
(`builders.prepare(builder, beam_options=...)`: DirectRunner here, Dataflow, Spark or Flink at scale)
and writes ArrayRecord shards. Per file, each bad record increments a Beam counter named after its
cause; a file whose bad records exceed `max_bad_fraction` of its records stops the build with an
`InputError` naming the file and its first bad record. After the pipeline the counters become
`info.metadata['dropped']` ({cause: count}, saved with the dataset) and `info.metadata['records']`.
Record keys must be unique across the files of a split (TFDS checks): prefix them with the file name.
Requires the `data` extra (`pip install -e .[data]`).
"""

import dataclasses
import functools
from collections.abc import Callable, Iterator, Mapping

import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from flamingo_jax.data.builders import common

COUNTER_NAMESPACE = "flamingo_jax_data"
Reader = Callable[[str], tuple[list[tuple[str, dict]], list[tuple[str, str]], int]]


@dataclasses.dataclass(eq=False)
class BeamSourcesConfig(tfds.core.BuilderConfig):
  """sources: `{split: (paths or glob patterns, ...)}`; max_bad_fraction: bad records allowed per file."""

  sources: Mapping[str, tuple[str, ...]] | None = None
  max_bad_fraction: float = 0.05


def beam_config(
  name: str, sources: str | list[str] | Mapping[str, list[str] | str], max_bad_fraction: float = 0.05
) -> BeamSourcesConfig:
  """A `BeamSourcesConfig`; a pattern or a list of them means `{'train': ...}`; a pattern string may
  hold several, ','-separated (as the command line gives them)."""
  if not isinstance(sources, Mapping):
    sources = {"train": sources}

  def patterns(v):
    return tuple(p for p in v.split(",") if p) if isinstance(v, str) else tuple(str(p) for p in v)

  as_tuple = {str(k): patterns(v) for k, v in sources.items()}
  return BeamSourcesConfig(
    name=name, sources=as_tuple, max_bad_fraction=float(max_bad_fraction), description=f"sources {as_tuple}"
  )


def expand_sources(patterns: tuple[str, ...], where: str) -> list[str]:
  """The sorted files matched by `patterns`; a pattern matching nothing is an error naming it."""
  files = []
  for pattern in patterns:
    path = epath.Path(pattern)
    matched = (
      sorted(str(p) for p in path.parent.glob(path.name)) if any(c in path.name for c in "*?[") else []
    )
    if not matched and path.exists():
      matched = [str(path)]
    if not matched:
      raise FileNotFoundError(f"{where}: no source file matches {pattern}")
    files += matched
  return sorted(set(files))


def source_examples(path: str, reader: Reader, max_bad_fraction: float) -> Iterator[tuple[str, dict]]:
  """The records of one file for Beam, each bad one counted under its cause; raises past the bound."""
  from apache_beam import metrics  # pylint: disable=g-import-not-at-top  (the `data` extra)

  records, bad, total = reader(path)
  for cause, _ in bad:
    metrics.Metrics.counter(COUNTER_NAMESPACE, cause).inc()
  metrics.Metrics.counter(COUNTER_NAMESPACE, "records").inc(len(records))
  if bad and len(bad) > max_bad_fraction * max(total, 1):
    cause, key = bad[0]
    raise common.InputError(
      f"{path}: {len(bad)} bad of {total} records (more than max_bad_fraction={max_bad_fraction:g}); "
      f"the first: {key} ({cause})"
    )
  yield from records


class BeamBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the Beam-prepared builders (module docstring); subclasses set the class attributes."""

  VERSION = tfds.core.Version(common.VERSION)
  DESCRIPTION = ""
  CAUSES: tuple[str, ...] = ()
  reader: Reader  # a module-level function (Beam pickles it by reference)

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(self._features()),
      metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local or gs:// files only
    config = self.builder_config
    if not isinstance(config, BeamSourcesConfig) or not config.sources:
      raise ValueError(f"{self.name}: pass config=beam_config(name, {{split: files}}); got {config!r}")
    where = f"{self.name}/{config.name}"
    return {split: self._generate_examples(expand_sources(p, where)) for split, p in config.sources.items()}

  def _generate_examples(self, files: list[str]):
    beam = tfds.core.lazy_imports.apache_beam
    read = functools.partial(
      source_examples, reader=type(self).reader, max_bad_fraction=self.builder_config.max_bad_fraction
    )
    return beam.Create(files) | beam.FlatMap(read)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """Beam's counters -> `info.metadata['dropped']` and `['records']`, and a log line."""
    from apache_beam.metrics.metric import MetricsFilter  # pylint: disable=g-import-not-at-top

    found = pipeline_result.metrics().query(MetricsFilter().with_namespace(COUNTER_NAMESPACE))["counters"]
    totals = {}
    for counter in found:
      totals[counter.key.metric.name] = totals.get(counter.key.metric.name, 0) + counter.committed
    self.info.metadata["records"] = int(totals.pop("records", 0))
    dropped = {cause: int(totals.get(cause, 0)) for cause in self.CAUSES}
    self.info.metadata["dropped"] = dropped
    if any(dropped.values()):
      logging.warning("%s/%s: dropped records %s", self.name, self.builder_config.name, dropped)
