"""Input pipeline throughput: images/s per host core against bare TensorFlow, and the easy-VQA mixture.

  python benchmarks/data_throughput.py                         # images: 256 JPEGs, step time 1 s
  python benchmarks/data_throughput.py images --step_time 0.5 --images 512
  python benchmarks/data_throughput.py mixture --data_dir /tmp/flamingo_tfds --steps 30
  python benchmarks/data_throughput.py mixture --max_examples 256 --tokenizer bytes   # quick

images: the training input pipeline itself (`pipeline.DatasetPipeline` over a pairs source of
JPEGs of 480-800 px: the record and its text in Python, then decode, resize to 320 px, pad, flip +
colour jitter in TF ops, batch) against bare `tf.io.decode_jpeg` + `tf.image.resize` to 320 x 320 in
a tf.data map, on the same images in the same run, both on one core (the process pinned to one CPU,
one map thread per stage, TF's thread pools at 1). Prints images/s for each and the ratio (target
>= 0.8x), then the host cores per accelerator that the paper's 3b and 80b configs need at
`--step_time`, from their global batches.

mixture: builds the easy_vqa datasets into --data_dir if missing (offline), then times each
dataset's pipeline alone (after --warmup steps), then the whole mixture (all datasets every step, as
in training). The tokenizer is SmolLM2's, or a byte-level stand-in with --tokenizer bytes.

Prints one line per measurement; never asserted in tests.
"""

import argparse
import io
import os
import re
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flamingo_jax.data import mixture  # pylint: disable=g-import-not-at-top

SIZE = 320


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
  """`count` photo-like JPEGs (smooth gradients plus noise) of 480-800 px per side."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    w, h = (int(v) for v in rng.integers(480, 801, size=2))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, (xx + yy) / (w + h)], -1) * 200
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    out.append(buf.getvalue())
  return out


class ByteTokenizer:
  """UTF-8 bytes as ids 3..258 (0 pad, 1 BOS, 2 EOS); `<image>` = 259, `<EOC>` = 260."""

  pad_id, bos_id, eos_id, image_id, eoc_id, vocab_size = 0, 1, 2, 259, 260, 261
  _SPECIAL = re.compile(r"(<image>|<EOC>)")

  def encode(self, text: str) -> list[int]:
    ids = []
    for piece in self._SPECIAL.split(text):
      if piece in ("<image>", "<EOC>"):
        ids.append(self.image_id if piece == "<image>" else self.eoc_id)
      else:
        ids += [b + 3 for b in piece.encode("utf-8")]
    return ids

  def decode(self, ids) -> str:
    return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")


def make_tokenizer(kind: str):
  if kind == "bytes":
    return ByteTokenizer()
  from flamingo_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top

  return Tokenizer.smollm2()


def timed(iterator, steps: int, warmup: int) -> float:
  """Seconds per step after `warmup` steps."""
  for _ in range(warmup):
    next(iterator)
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return (time.perf_counter() - start) / steps


def pipeline_per_second(jpegs: list[bytes], batch: int) -> float:
  """Images/s of the training pipeline (`DatasetPipeline`, pairs, training mode) on one map thread."""
  from flamingo_jax.data import pipeline, preprocess  # pylint: disable=g-import-not-at-top

  source = [
    {"image": data, "image_path": f"{i}.jpg".encode(), "image_missing": False, "text": b"a photo"}
    for i, data in enumerate(jpegs)
  ]
  spec = pipeline.DatasetSpec(
    name="bench",
    kind="pairs",
    batch_size=batch,
    max_tokens=16,
    image=preprocess.ImageOptions(size=SIZE),
    num_parallel_calls=1,
  )
  p = pipeline.DatasetPipeline(spec, source, ByteTokenizer(), seed=0)
  next(p)  # trace the graph and warm the code paths
  steps = len(jpegs) // batch
  start = time.perf_counter()
  for _ in range(steps):
    next(p)
  elapsed = time.perf_counter() - start
  p.close()
  return steps * batch / elapsed


def tf_per_second(jpegs: list[bytes], batch: int) -> float:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def decode(data):
    return tf.image.resize(tf.io.decode_jpeg(data, channels=3), (SIZE, SIZE))

  options = tf.data.Options()
  options.threading.private_threadpool_size = 1
  options.threading.max_intra_op_parallelism = 1
  ds = (
    tf.data.Dataset.from_tensor_slices(jpegs)
    .map(decode, num_parallel_calls=1)
    .batch(batch)
    .with_options(options)
  )
  for _ in ds.take(1):  # trace once
    pass
  start = time.perf_counter()
  for _ in ds:
    pass
  return len(jpegs) / (time.perf_counter() - start)


def images_per_step_per_device(size: str) -> dict[str, float]:
  """The paper config's images per step (frames for video) over its device count, per dataset."""
  from configs import flamingo as flamingo_config  # pylint: disable=g-import-not-at-top

  devices = {"3b": 256, "9b": 512, "80b": 1536}[size]
  config = flamingo_config.get_config(f"size={size}")
  return {
    name: ds.batch_size * ds.max_images * ds.num_frames / devices for name, ds in config.data.datasets.items()
  }


def images(args) -> None:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  if hasattr(os, "sched_setaffinity"):  # one core for every thread of both pipelines
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  jpegs = make_jpegs(args.images)
  ours = pipeline_per_second(jpegs, args.batch)
  bare = tf_per_second(jpegs, args.batch)
  print(f"{args.images} JPEGs of 480-800 px -> {SIZE} px, one core")
  print(f"  training pipeline (decode, resize, pad, flip + jitter, batch): {ours:7.1f} images/s")
  print(f"  tf.io.decode_jpeg + tf.image.resize:                          {bare:7.1f} images/s")
  print(f"  ratio: {ours / bare:.2f}x (target >= 0.8x)")
  for size in ("3b", "80b"):
    per_device = images_per_step_per_device(size)
    total = sum(per_device.values())
    cores = total / (ours * args.step_time)
    detail = ", ".join(f"{k} {v:.1f}" for k, v in per_device.items())
    print(
      f"{size}: {total:.1f} images per device per step ({detail}); at {args.step_time:g} s/step "
      f"that is {cores:.2f} host cores per device"
    )


def mixture_throughput(args) -> None:
  tokenizer = make_tokenizer(args.tokenizer)
  config = mixture.easy_vqa_mixture_config(args.max_examples, image_size=args.image_size)
  if args.tokenizer == "bytes":  # ~4x longer sequences than SmolLM2's BPE
    for ds in config.datasets.values():
      ds.max_tokens *= 4
  start = time.perf_counter()
  mixture.prepare_datasets(config, args.data_dir)
  print(f"prepare (build if missing): {time.perf_counter() - start:.1f} s in {args.data_dir}")

  with mixture.make_mixture(
    config, tokenizer, args.data_dir, seed=0, process_index=0, process_count=1
  ) as mix:
    for name, p in mix.pipelines.items():
      per_step = timed(p, args.steps, args.warmup)
      p.close()
      b = p.spec.batch_size
      print(
        f"{name:6s} {p.spec.kind:11s} batch {b:3d}  {b / per_step:8.1f} examples/s  "
        f"{1e3 * per_step:7.1f} ms/step  (N={p.spec.max_images} F={p.spec.num_frames} "
        f"S={p.spec.image.size} T={p.spec.max_tokens})"
      )
  with mixture.make_mixture(
    config, tokenizer, args.data_dir, seed=1, process_index=0, process_count=1
  ) as mix:
    per_step = timed(mix, args.steps, args.warmup)
    total = sum(p.spec.batch_size for p in mix.pipelines.values())
    print(
      f"mixture (all {len(mix.pipelines)} datasets per step): {1e3 * per_step:.1f} ms/step, "
      f"{total / per_step:.1f} examples/s"
    )
    print(f"drops: { {n: m['dropped'] for n, m in mix.metrics().items()} }")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("what", nargs="?", choices=("images", "mixture"), default="images")
  parser.add_argument("--images", type=int, default=256, help="images: JPEGs to time")
  parser.add_argument("--batch", type=int, default=32, help="images: batch size")
  parser.add_argument("--step_time", type=float, default=1.0, help="images: seconds per training step")
  parser.add_argument("--data_dir", default=os.path.join(tempfile.gettempdir(), "flamingo_tfds"))
  parser.add_argument("--steps", type=int, default=20, help="mixture: timed steps")
  parser.add_argument("--warmup", type=int, default=3, help="mixture: untimed steps first")
  parser.add_argument("--max_examples", type=int, default=None, help="mixture: examples per split")
  parser.add_argument("--image_size", type=int, default=64, help="mixture: image side")
  parser.add_argument("--tokenizer", choices=("smollm2", "bytes"), default="smollm2")
  args = parser.parse_args()
  (images if args.what == "images" else mixture_throughput)(args)


if __name__ == "__main__":
  main()
