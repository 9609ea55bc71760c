"""Image preprocessing per host core at 320 px, against bare TensorFlow decode + resize on the same images.

  python benchmarks/image_throughput.py                    # 256 JPEGs of 480-800 px, step time 1 s
  python benchmarks/image_throughput.py --step_time 0.5 --images 512

Ours: `preprocess.load_image` (decode at the smallest JPEG scale >= 320, RGB, aspect-preserving
resize, pad, flip + colour jitter) for each image, then the batch stacked: what every input pipeline
runs per image. Baseline: `tf.io.decode_jpeg` + `tf.image.resize` to 320 x 320 in a tf.data map with
one thread. Both run on one core (TF's thread pools set to 1), on the same encoded images, in this
run. Prints images/s per core for each and the ratio (target >= 0.8x), then the host cores per
accelerator that the paper configs need to keep up with `--step_time`, from their global batches.
"""

import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def ours_per_second(jpegs: list[bytes], batch: int) -> float:
  from flamingo_jax.data import preprocess  # pylint: disable=g-import-not-at-top

  options = preprocess.ImageOptions(size=SIZE)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(0, len(jpegs), batch):
    images = [
      preprocess.load_image(
        data, missing=False, path="bench", options=options, augment=preprocess.Augment.draw(rng, options)
      )
      for data in jpegs[i : i + batch]
    ]
    np.stack(images)
  return len(jpegs) / (time.perf_counter() - start)


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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--step_time", type=float, default=1.0, help="seconds per training step")
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tf.config.threading.set_intra_op_parallelism_threads(1)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  jpegs = make_jpegs(args.images)
  ours_per_second(jpegs[:8], args.batch)  # warm PIL's and numpy's code paths
  ours = ours_per_second(jpegs, args.batch)
  bare = tf_per_second(jpegs, args.batch)
  print(f"{args.images} JPEGs of 480-800 px -> {SIZE} px, one core")
  print(f"  ours (decode, resize, pad, flip + jitter, batch): {ours:7.1f} images/s")
  print(f"  tf.io.decode_jpeg + tf.image.resize:             {bare:7.1f} images/s")
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


if __name__ == "__main__":
  main()
