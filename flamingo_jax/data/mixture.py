"""The training mixture: every step yields one host batch of EVERY dataset, `{name: batch}`.

The loss is `sum_m weight_m * NLL_m` (the paper's lambdas: M3W 1.0, ALIGN/LTIP 0.2, VTP 0.03); the
weights ride along in `Mixture.weights`. Each dataset has its own global batch size, token budget
and media shape (`pipeline.DatasetSpec`); see `pipeline.py` for order, sharding and bad input.

Iterator state. Every batch is a pure function of (seed, step, dataset), so the state is the step:
`get_state()` returns a JSON-able dict `{'step': int, 'seed': int, 'datasets': {name: {'records':
int, 'batch_size': int}}}` (the last two only to refuse a restore onto different data), identical on
all hosts and independent of the host count; save it with the model, e.g. Orbax
`ocp.args.JsonSave(mixture.get_state())` / `ocp.args.JsonRestore()`. `set_state(state)` restarts
every pipeline at that step: the next batches are exactly those an uninterrupted run would see,
at O(1) cost (no skipping through the data). Drop counters (`metrics()`) are per host and restart
from zero.

Config schema (`ml_collections.ConfigDict`, see `dataset_config` and `easy_vqa_mixture_config`):
  prepare: bool               build missing TFDS datasets into data_dir (offline) when making it
  num_parallel_calls: int     tf.data map parallelism per dataset (-1 = AUTOTUNE)
  prefetch: int               batches prefetched per dataset
  datasets: {name: dataset_config(...)} with, per dataset:
    kind                      'interleaved' | 'pairs' | 'video'
    builder, builder_kwargs   TFDS builder name and its config (`builders.make_builder`)
    split                     e.g. 'train'
    weight                    lambda of the dataset's loss
    batch_size                GLOBAL batch (divisible by the number of hosts)
    max_tokens                T (tokens per sequence; the sequence holds T+1 ids)
    max_images, num_frames    N media per sequence (interleaved), F frames per media (video)
    image_size                S (square output; aspect kept, padded with pad_value)
    pad_value, flip, brightness, contrast, saturation      images (`preprocess.ImageOptions`)
    pad_with_mean             pad with the dataset's mean colour (App. A.3) instead of pad_value: the
                              mean of `MEAN_COLOUR_SAMPLES` images at evenly spaced records
    min_image_side, max_aspect_ratio   the paper's image filters (64 px, 3; 0 = off), counted as drops
    text_template             pairs/video text from the record's fields, e.g. '{text}'
    loss_from                 pairs: the loss starts at this template field, e.g. 'answer' ('' = all)
    p_next                    per-sequence probability of attending to the next image (training)
    window                    interleaved, training: 'random' window of a long document (App. A.3) or
                              its 'first' ids
    max_drop_ratio, drop_check_after                       bad-input bound (`pipeline.DataError`)
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
import tensorflow as tf

from flamingo_jax.data import builders, pipeline, preprocess


def dataset_config(**overrides: Any) -> ml_collections.ConfigDict:
  """One dataset's config with every key (defaults: an image-text pairs dataset)."""
  config = ml_collections.ConfigDict(
    {
      "kind": "pairs",
      "builder": "easy_vqa",
      "builder_kwargs": {},
      "split": "train",
      "weight": 1.0,
      "batch_size": 8,
      "max_tokens": 32,
      "max_images": 1,
      "num_frames": 1,
      "image_size": 320,
      "pad_value": (0.5, 0.5, 0.5),
      "pad_with_mean": False,
      "flip": True,
      "brightness": 0.1,
      "contrast": 0.1,
      "saturation": 0.1,
      "min_image_side": 0,
      "max_aspect_ratio": 0.0,
      "text_template": "{text}",
      "p_next": 0.0,
      "window": "random",
      "loss_from": "",
      "max_drop_ratio": 0.05,
      "drop_check_after": 200,
    }
  )
  for key, value in overrides.items():
    if key not in config:
      raise KeyError(f"dataset_config: unknown key {key!r}; keys: {sorted(config)}")
    config[key] = value
  return config


def easy_vqa_mixture_config(
  max_examples: int | None = None, image_size: int = 64
) -> ml_collections.ConfigDict:
  """The easy-VQA mixture: m3w (interleaved, 1.0), pairs (captions, 0.2), vqa (0.2), vtp (0.03),
  bursty (in-context binding documents, 1.0; `data/binding.py`).

  `vqa` is a second paired set (the paper has two, ALIGN and LTIP, 0.2 each) whose text is the
  VQA prompt 'Question: {q} Answer: {a}', with the loss on the answer only (`loss_from`). Batch
  sizes are small for a CPU; `max_examples` builds only that many records per split (tests). The token budgets hold every easy-VQA sequence with the
  SmolLM2 tokenizer (longest: documents 62 ids, VQA 20, clips 15, captions 9); a byte-level
  tokenizer needs about 4x more.

  Long: a declarative table of the datasets' fields.
  """

  def easy(kind):
    return {"kind": kind, "max_examples": max_examples}

  datasets = {
    "m3w": dataset_config(
      kind="interleaved",
      builder_kwargs=easy("interleaved"),
      weight=1.0,
      batch_size=8,
      max_tokens=64,
      max_images=5,
      image_size=image_size,
      p_next=0.5,
      # Every answer follows its own image: a window starting mid-document would train on answers
      # whose image it cut off (docs/EXPERIMENTS.md).
      window="first",
    ),
    "pairs": dataset_config(
      kind="pairs",
      builder_kwargs=easy("captions"),
      weight=0.2,
      batch_size=16,
      max_tokens=16,
      image_size=image_size,
    ),
    "vqa": dataset_config(
      kind="pairs",
      builder_kwargs=easy("vqa"),
      weight=0.2,
      batch_size=16,
      max_tokens=24,
      image_size=image_size,
      text_template="Question: {question} Answer: {answer}",
      loss_from="answer",
    ),
    "vtp": dataset_config(
      kind="video",
      builder_kwargs=easy("video"),
      weight=0.03,
      batch_size=8,
      max_tokens=20,
      num_frames=8,
      image_size=image_size,
    ),
    # Longest document: 109 SmolLM2 ids. Every text follows its own image: no p_next.
    "bursty": dataset_config(
      kind="interleaved",
      builder_kwargs={**easy("bursty"), "names_file": ""},
      weight=1.0,
      batch_size=4,
      max_tokens=112,
      max_images=12,
      image_size=image_size,
      p_next=0.0,
      window="first",  # the names' loss needs the document's earlier occurrences
    ),
  }
  return ml_collections.ConfigDict(
    {"prepare": True, "num_parallel_calls": -1, "prefetch": 2, "datasets": datasets}
  )


def dataset_spec(
  name: str, config: ml_collections.ConfigDict, *, num_parallel_calls: int = -1, prefetch: int = 2
) -> pipeline.DatasetSpec:
  """A `pipeline.DatasetSpec` from one dataset's config."""
  image = preprocess.ImageOptions(
    size=config.image_size,
    pad_value=tuple(float(v) for v in config.pad_value),
    flip=config.flip,
    brightness=config.brightness,
    contrast=config.contrast,
    saturation=config.saturation,
    min_side=config.min_image_side,
    max_aspect=config.max_aspect_ratio,
  )
  return pipeline.DatasetSpec(
    name=name,
    kind=config.kind,
    batch_size=config.batch_size,
    max_tokens=config.max_tokens,
    max_images=config.max_images,
    num_frames=config.num_frames,
    image=image,
    text_template=config.text_template,
    p_next=config.p_next,
    window=config.window,
    loss_from=config.loss_from,
    max_drop_ratio=config.max_drop_ratio,
    drop_check_after=config.drop_check_after,
    num_parallel_calls=tf.data.AUTOTUNE if num_parallel_calls < 0 else num_parallel_calls,
    prefetch=prefetch,
  )


class Mixture:
  """Iterator of `{name: host batch}` over all datasets, with a saveable state (module docstring)."""

  def __init__(
    self, pipelines: Mapping[str, pipeline.DatasetPipeline], weights: Mapping[str, float], *, seed: int
  ):
    if set(pipelines) != set(weights):
      raise ValueError(f"datasets {sorted(pipelines)} but weights for {sorted(weights)}")
    if not pipelines:
      raise ValueError("a mixture needs at least one dataset")
    steps = {p.step for p in pipelines.values()}
    if len(steps) != 1:
      raise ValueError(f"pipelines start at different steps {steps}")
    self.pipelines = dict(pipelines)
    self.weights = {k: float(v) for k, v in weights.items()}
    self.seed = int(seed)
    self._step = steps.pop()

  @property
  def step(self) -> int:
    return self._step

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, dict[str, Any]]:
    batches = {name: next(p) for name, p in self.pipelines.items()}
    self._step += 1
    return batches

  def get_state(self) -> dict[str, Any]:
    """JSON-able state, the same on every host (see the module docstring)."""
    return {
      "step": self._step,
      "seed": self.seed,
      "datasets": {
        name: {"records": p.num_records, "batch_size": p.spec.batch_size}
        for name, p in self.pipelines.items()
      },
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` result; raises if it describes other data."""
    if int(state["seed"]) != self.seed:
      raise ValueError(f"data state has seed {state['seed']}, this mixture {self.seed}")
    mine = self.get_state()["datasets"]
    theirs = {k: {kk: int(vv) for kk, vv in v.items()} for k, v in state["datasets"].items()}
    if theirs != mine:
      raise ValueError(f"data state describes datasets {theirs}; this mixture has {mine}")
    step = int(state["step"])
    for p in self.pipelines.values():
      p.restart(step)
    self._step = step

  def close(self) -> None:
    """Stops the pipelines' background work (also done at exit)."""
    for p in self.pipelines.values():
      p.close()

  def __enter__(self) -> "Mixture":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def metrics(self) -> dict[str, dict[str, float]]:
    """{dataset: counts} of this host (sum the counts over hosts, then form ratios)."""
    return {name: p.metrics() for name, p in self.pipelines.items()}


def make_mixture(
  config: ml_collections.ConfigDict,
  tokenizer,
  data_dir: str,
  seed: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  training: bool = True,
) -> Mixture:
  """The mixture of `config.datasets` read from TFDS datasets in `data_dir`.

  process_index/process_count default to `jax.process_index()/jax.process_count()`. With
  `config.prepare`, missing datasets are built first (on every host: give each host its own
  data_dir, or prepare once beforehand with `prepare_datasets`). `training=False`: records in order,
  no augmentation, no leading space, no p_next.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only the default needs it)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  pipelines, weights = {}, {}
  for name, ds in config.datasets.items():
    builder = builders.make_builder(ds.builder, data_dir, **ds.builder_kwargs.to_dict())
    if config.prepare:
      builders.prepare(builder)
    source = builder.as_data_source(ds.split)
    spec = dataset_spec(name, ds, num_parallel_calls=config.num_parallel_calls, prefetch=config.prefetch)
    if ds.pad_with_mean:  # the same records on every host, so the same colour
      pad = preprocess.mean_colour(sample_images(source, ds.kind))
      spec = dataclasses.replace(spec, image=dataclasses.replace(spec.image, pad_value=pad))
    pipelines[name] = pipeline.DatasetPipeline(
      spec,
      source,
      tokenizer,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      training=training,
    )
    weights[name] = ds.weight
  return Mixture(pipelines, weights, seed=seed)


# Images whose mean colour pads a dataset's images (`pad_with_mean`): enough for a stable mean, cheap to
# decode at start-up.
MEAN_COLOUR_SAMPLES = 256
# The field of each kind's stored records that holds its encoded images (one, or a list).
IMAGE_FIELD = {"pairs": "image", "interleaved": "images", "video": "frames"}


def sample_images(source, kind: str, samples: int = MEAN_COLOUR_SAMPLES) -> list[bytes]:
  """The encoded images of up to `samples` records at evenly spaced indices of `source` (one image per
  record: the first of a document, the middle frame of a clip)."""
  count = len(source)
  out = []
  for index in sorted({int(i) for i in np.linspace(0, count - 1, min(samples, count))} if count else ()):
    value = source[index][IMAGE_FIELD[kind]]
    if kind == "pairs":
      out.append(bytes(value))
    elif len(value):
      out.append(bytes(value[0] if kind == "interleaved" else value[len(value) // 2]))
  return out


def prepare_datasets(config: ml_collections.ConfigDict, data_dir: str, beam_options: str = "") -> None:
  """Builds every dataset of `config` into data_dir (offline), e.g. once before a multi-host run;
  the Beam-prepared builders run on the runner of `beam_options` (`builders.prepare`)."""
  for ds in config.datasets.values():
    builder = builders.make_builder(ds.builder, data_dir, **ds.builder_kwargs.to_dict())
    builders.prepare(builder, beam_options=beam_options)
