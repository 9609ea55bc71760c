"""One dataset's input pipeline: random-access records -> tf.data -> host batches (static shapes).

Shapes: B host batch (= global batch / process_count), G global batch, N media, F frames, S side,
T tokens. Batch (docs/ARCHITECTURE.md, "Batches"): images f32 [B,N,F,S,S,3], media_mask bool [B,N],
tokens/targets int32 [B,T], loss_mask f32 [B,T], media_index int32 [B,T], token_mask bool [B,T].

Order and sharding. The stream is a sequence of global positions g = 0, 1, 2, ...: step s of the
global batch holds g in [s G, (s+1) G), and host p reads the slice [s G + p B, s G + (p+1) B). So
hosts read disjoint examples, and the concatenation of the hosts' batches (in process order) is
exactly the batch a single host with batch G reads. Position g is record
`index_shuffle(g mod R, seed=(seed, dataset key, epoch = g div R))` of the R records in training
(a fresh pseudo-random permutation per epoch, computed per element, no shuffle buffer), record
`g mod R` in eval. Augmentation, the leading space and p_next draw from
`np.random.default_rng([seed, dataset key, g])`. Everything is a function of (seed, g): a pipeline
restarted at step s yields exactly the batches an uninterrupted one yields from step s (the iterator
state is the step; `mixture.py`).

Two stages per example: Python (`tf.numpy_function`, parallel map) reads the record, builds its
text and plans its images from their headers (`preprocess.plan_image`); TF ops then decode, resize,
augment and pad the images (`render.render`), so the per-pixel work runs outside the GIL.

Bad examples. An example that raises `Dropped` in the Python stage becomes an empty row (no media, all masks
False: it adds nothing to a token-weighted loss), so batches keep their static shape and the
positions of all later examples stay put. Drops are counted per reason from the batches actually
yielded (`metrics()`), the first of each reason is logged with its file, and a drop ratio above
`max_drop_ratio` (once `drop_check_after` examples were seen) raises `DataError`.
"""

import collections
import dataclasses
import functools
import logging
import weakref
import zlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import tensorflow as tf

from flamingo_jax.data import interleaved, pairs, preprocess, render, sequence, video

KINDS = {
  "pairs": pairs.process_pair,
  "interleaved": interleaved.process_document,
  "video": video.process_clip,
}
_INFO = ("_reason", "_notes", "_detail")
_log = logging.getLogger(__name__)


class _IteratorHolder:
  """Owns a pipeline's tf.data iterator so that it can be released at exit (see `close`)."""

  def __init__(self):
    self.iterator = None

  def close(self):
    self.iterator = None


class DataError(RuntimeError):
  """Too many bad examples in a dataset."""


class RecordSource(Protocol):
  """Random access to decoded records (e.g. `builder.as_data_source(split)`)."""

  def __len__(self) -> int: ...
  def __getitem__(self, index: int) -> Mapping[str, Any]: ...


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What one dataset yields. batch_size is GLOBAL (over all hosts)."""

  name: str
  kind: str  # 'pairs' | 'interleaved' | 'video'
  batch_size: int
  max_tokens: int  # T
  max_images: int = 1  # N (1 for pairs and video)
  num_frames: int = 1  # F (1 for pairs and interleaved)
  image: preprocess.ImageOptions = preprocess.ImageOptions()
  text_template: str = "{text}"
  p_next: float = 0.0  # per-sequence probability of attending to the next image (training)
  window: str = "random"  # interleaved, training: 'random' (App. A.3) or 'first' ids of a document
  loss_from: str = ""  # pairs: the loss starts at this template field ('' = all the text)
  max_drop_ratio: float = 0.05
  drop_check_after: int = 200  # examples seen before the drop ratio is checked
  num_parallel_calls: int = tf.data.AUTOTUNE  # AUTOTUNE = the CPU count (autotuning is off)
  prefetch: int = 2  # batches

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"dataset {self.name!r}: kind {self.kind!r} not in {sorted(KINDS)}")
    if self.kind != "interleaved" and self.max_images != 1:
      raise ValueError(f"dataset {self.name!r}: {self.kind} has one media item; max_images must be 1")
    if self.loss_from and self.kind != "pairs":
      raise ValueError(f"dataset {self.name!r}: loss_from is for pairs, not {self.kind}")
    if self.loss_from and "{" + self.loss_from + "}" not in self.text_template:
      raise ValueError(
        f"dataset {self.name!r}: loss_from {self.loss_from!r} is not a field of "
        f"text_template {self.text_template!r}"
      )
    if self.window not in interleaved.WINDOWS:
      raise ValueError(f"dataset {self.name!r}: window {self.window!r} not in {interleaved.WINDOWS}")
    if self.kind != "video" and self.num_frames != 1:
      raise ValueError(f"dataset {self.name!r}: {self.kind} images have num_frames=1")
    for key in ("batch_size", "max_tokens", "max_images", "num_frames"):
      if getattr(self, key) < 1:
        raise ValueError(f"dataset {self.name!r}: {key} must be >= 1")

  @property
  def key(self) -> int:
    """A stable 31-bit key of the name (seeds the dataset's order and augmentation)."""
    return zlib.crc32(self.name.encode()) & 0x7FFFFFFF


def example_shapes(spec: DatasetSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of one example (a batch row)."""
  s = spec.image.size
  return {"images": ((spec.max_images, spec.num_frames, s, s, 3), tf.float32), **_text_shapes(spec)}


def _planned_shapes(spec: DatasetSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  """{key: (shape, dtype)} of what the Python part returns: planned images instead of pixels."""
  n, f = spec.max_images, spec.num_frames
  planned = {
    "image_data": ((n, f), tf.string),
    "image_plan": ((n, f, 3), tf.int32),
    "image_augment": ((n, f, 4), tf.float32),
  }
  return {**planned, **_text_shapes(spec)}


def _text_shapes(spec: DatasetSpec) -> dict[str, tuple[tuple[int, ...], Any]]:
  t = spec.max_tokens
  return {
    "media_mask": ((spec.max_images,), tf.bool),
    "tokens": ((t,), tf.int32),
    "targets": ((t,), tf.int32),
    "loss_mask": ((t,), tf.float32),
    "media_index": ((t,), tf.int32),
    "token_mask": ((t,), tf.bool),
  }


class DatasetPipeline:
  """An iterator of host batches of one dataset, starting at a given step (see module docstring)."""

  def __init__(
    self,
    spec: DatasetSpec,
    source: RecordSource,
    tokenizer,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    training: bool = True,
    step: int = 0,
  ):
    if spec.batch_size % process_count:
      raise ValueError(
        f"dataset {spec.name!r}: global batch_size {spec.batch_size} is not "
        f"divisible by process_count {process_count}"
      )
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if seed < 0:
      raise ValueError(f"seed must be >= 0, got {seed}")
    self.spec = spec
    self.num_records = len(source)
    if not self.num_records:
      raise ValueError(f"dataset {spec.name!r}: the source has no records")
    self._source = source
    self._seed = int(seed)
    self._process_index = process_index
    self._host_batch = spec.batch_size // process_count
    self._training = training
    self._process: Callable = functools.partial(
      KINDS[spec.kind],
      tokenizer=tokenizer,
      image_options=spec.image,
      max_tokens=spec.max_tokens,
      max_images=spec.max_images,
      num_frames=spec.num_frames,
      text_template=spec.text_template,
      p_next=spec.p_next,
      loss_from=spec.loss_from,
      window=spec.window,
    )
    self._empty = sequence.empty_example(
      max_tokens=spec.max_tokens,
      max_images=spec.max_images,
      num_frames=spec.num_frames,
      pad_id=tokenizer.pad_id,
    )
    self._counts = collections.Counter()
    self._undecodable: set[int] = set()  # records with an image TF cannot decode (`_mark_undecodable`)
    self._logged: set[str] = set()
    self._step = int(step)
    # A live tf.data iterator whose threads run Python (numpy_function) hangs the interpreter's
    # shutdown: release it at exit at the latest (weakref.finalize runs before finalization).
    self._holder = _IteratorHolder()
    weakref.finalize(self, self._holder.close)

  @property
  def step(self) -> int:
    """The step of the next batch."""
    return self._step

  def restart(self, step: int) -> None:
    """Continues from `step` (the next batch is the one an uninterrupted run yields at `step`)."""
    self._step = int(step)
    self._holder.close()

  def close(self) -> None:
    """Stops the background work (also done at exit); the next `next()` starts it again."""
    self._holder.close()

  # -- per example (Python, inside tf.numpy_function) ------------------------------------------

  def _example(self, position: int, index: int) -> tuple[dict[str, np.ndarray], int]:
    """(example with planned images, notes) of record `index` at global position `position`."""
    rng = np.random.default_rng([self._seed, self.spec.key, position]) if self._training else None
    if index in self._undecodable:
      raise sequence.Dropped("corrupt_image", f"record {index}: TensorFlow cannot decode an image of it")
    return self._process(self._source[index], rng)

  def _load(self, position: np.int64, index: np.int64) -> tuple:
    g, index = int(position), int(index)
    reason, notes, detail = 0, 0, ""
    try:
      example, notes = self._example(g, index)
    except sequence.Dropped as e:
      example, reason, detail = self._empty, sequence.reason_code(e.reason), e.detail
    except Exception as e:  # pylint: disable=broad-except  (bad data must not stop training)
      example, reason = self._empty, sequence.reason_code("bad_example")
      detail = f"record {index}: {type(e).__name__}: {e}"
    return (
      *(example[k] for k in _planned_shapes(self.spec)),
      np.int32(reason),
      np.int32(notes),
      np.bytes_(detail.encode("utf-8", "replace")),
    )

  # -- tf.data ------------------------------------------------------------------------------------

  def _positions(self, k: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Host-local element counter k -> (global position g, record index)."""
    b, p = self._host_batch, self._process_index
    g = (k // b) * self.spec.batch_size + p * b + k % b
    r = tf.constant(self.num_records, tf.int64)
    if not self._training or self.num_records == 1:
      return g, g % r
    seed = tf.stack(
      [tf.constant(self._seed, tf.int64), tf.constant(self.spec.key, tf.int64) * (2**32) + g // r]
    )
    return g, tf.random.experimental.index_shuffle(g % r, seed, r - 1)

  def dataset(self, step: int) -> tf.data.Dataset:
    """tf.data of host batches from `step` on (with the info keys '_reason', '_notes', '_detail')."""
    shapes = _planned_shapes(self.spec)
    tout = [dtype for _, dtype in shapes.values()] + [tf.int32, tf.int32, tf.string]

    def plan(k):  # Python: the record, its text and the plan of each image
      g, index = self._positions(k)
      out = tf.numpy_function(self._load, [g, index], tout, stateful=False)
      example = {key: tf.ensure_shape(v, shape) for (key, (shape, _)), v in zip(shapes.items(), out)}
      return {**example, **{key: tf.ensure_shape(v, []) for key, v in zip(_INFO, out[len(shapes) :])}}

    def pixels(example):  # TF ops: decode, resize, augment, pad
      planned = [example.pop(key) for key in preprocess.PLAN_KEYS]
      return {"images": render.render(*planned, self.spec.image), **example}

    start = step * self._host_batch
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    parallel = self.spec.num_parallel_calls
    ds = ds.map(plan, num_parallel_calls=parallel, deterministic=True)
    ds = ds.map(pixels, num_parallel_calls=parallel, deterministic=True)
    ds = ds.batch(self._host_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning: its model thread can take up to a minute to notice that an iterator is
    # deleted (seen at interpreter exit), and the parallelism here is set explicitly anyway.
    options.autotune.enabled = False
    return ds.prefetch(self.spec.prefetch).with_options(options)

  # -- iteration ----------------------------------------------------------------------------------

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      if self._holder.iterator is None:
        self._holder.iterator = self.dataset(self._step).as_numpy_iterator()
      try:
        batch = next(self._holder.iterator)
        break
      except tf.errors.InvalidArgumentError as e:  # an image whose header PIL read but TF cannot decode
        self._holder.close()
        self._mark_undecodable(self._step, e)  # then this batch again, without those records
    self._account(*(batch.pop(k) for k in _INFO))
    self._step += 1
    return batch

  def _mark_undecodable(self, step: int, error: Exception) -> None:
    """Finds the records of `step`'s batch whose images TF's decoders reject (rendering each image
    of the batch on its own) and marks them: from then on they are dropped as 'corrupt_image', the
    same in every run, since the finding depends only on the data."""
    found = set()
    for k in range(step * self._host_batch, (step + 1) * self._host_batch):
      g, index = (int(v) for v in self._positions(tf.constant(k, tf.int64)))
      try:
        example, _ = self._example(g, index)
      except Exception:  # pylint: disable=broad-except  (dropped in the Python stage anyway)
        continue
      for data, plan, params in zip(
        *(example[key].reshape(-1, *example[key].shape[2:]) for key in preprocess.PLAN_KEYS)
      ):
        try:
          render.render(tf.constant([data]), plan[None], params[None], self.spec.image)
        except tf.errors.InvalidArgumentError:
          found.add(index)
    if not found:
      raise DataError(
        f"dataset {self.spec.name!r}, step {step}: the input pipeline failed: {error}"
      ) from error
    self._undecodable.update(found)

  def _account(self, reasons: np.ndarray, notes: np.ndarray, details: np.ndarray) -> None:
    self._counts["examples"] += len(reasons)
    for r, n, d in zip(reasons.tolist(), notes.tolist(), details.tolist()):
      for bit, note in enumerate(sequence.NOTES):
        if n >> bit & 1:
          self._counts[note] += 1
      if r:
        reason = sequence.DROP_REASONS[r - 1]
        self._counts["dropped"] += 1
        self._counts[f"dropped/{reason}"] += 1
        if reason not in self._logged:
          self._logged.add(reason)
          _log.warning(
            "dataset %r: dropped an example (%s): %s; further drops of this kind are only counted",
            self.spec.name,
            reason,
            d.decode("utf-8", "replace"),
          )
    seen, dropped = self._counts["examples"], self._counts["dropped"]
    if seen >= self.spec.drop_check_after and dropped > self.spec.max_drop_ratio * seen:
      raise DataError(
        f"dataset {self.spec.name!r}: {dropped} of {seen} examples dropped "
        f"({dropped / seen:.1%} > max_drop_ratio {self.spec.max_drop_ratio:.1%}); by reason: "
        f"{ {k: v for k, v in self.metrics().items() if k.startswith('dropped/') and v} }; "
        f"see the warnings above for the first file of each reason"
      )

  def metrics(self) -> dict[str, float]:
    """This host's counts since construction: examples, dropped (+ per reason), truncations."""
    out = {"examples": self._counts["examples"], "dropped": self._counts["dropped"]}
    out.update({f"dropped/{r}": self._counts[f"dropped/{r}"] for r in sequence.DROP_REASONS})
    out.update({n: self._counts[n] for n in sequence.NOTES})
    out["drop_ratio"] = out["dropped"] / max(out["examples"], 1)
    return out
