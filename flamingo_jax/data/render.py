"""Images, TF side: a `preprocess.Plan` -> pixels, in TensorFlow ops inside tf.data.

Shapes: K image slots, S the output side. `render` maps data string [K], plan int32 [K, 3] (JPEG
scale, height, width) and augment float32 [K, 4] (`Augment.as_array`) to float32 [K, S, S, 3] in
[0,1]: decode (JPEG at 1/scale through libjpeg's DCT scaling), resize to (height, width) (bilinear,
`resize`), flip and colour jitter, then pad centred with `pad_value`. An empty string is an unused
slot and gives zeros. The same ops serve training (`pipeline.py`), evaluation and generation
(`load_image`), so the model sees one preprocessing.
"""

import functools

import numpy as np
import tensorflow as tf

from flamingo_jax.data import preprocess
from flamingo_jax.data.sequence import Dropped

_LUMA_COLUMNS = np.repeat(np.array(preprocess.LUMA, np.float32)[:, None], 3, axis=1)  # x @ it = luma


def augment(x: tf.Tensor, params: tf.Tensor) -> tf.Tensor:
  """x float32 [h,w,3] in [0,255], params [4] -> float32 [h,w,3] in [0,1].

  brightness x + d, contrast c (x - m) + m with m the mean luma (after brightness), saturation
  s (x - l) + l with l the pixel's luma: all affine, so one [h*w,3] @ [3,3] + b with the 1/255
  folded into the matrix (one pass over the pixels).
  """
  flip, d, c, s = params[0], params[1], params[2], params[3]
  x = tf.cond(flip > 0.5, lambda: tf.reverse(x, axis=[1]), lambda: x)
  luma = tf.constant(preprocess.LUMA, tf.float32)
  mean = tf.reduce_sum(tf.reduce_mean(x, [0, 1]) * luma) / 255.0 + d  # luma weights sum to 1
  a = (s * tf.eye(3) + (1.0 - s) * _LUMA_COLUMNS) * (c / 255.0)
  b = c * d + (1.0 - c) * mean  # a constant grey: saturation keeps it
  out = tf.linalg.matmul(tf.reshape(x, [-1, 3]), a) + b
  return tf.reshape(tf.clip_by_value(out, 0.0, 1.0), tf.shape(x))


def resize(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
  """uint8 [h', w', 3] -> float32 [height, width, 3] in [0,255], bilinear.

  Antialiased only where a reduction above 2x is left: JPEGs arrive DCT-scaled to within 2x of the
  target (libjpeg's scaling is itself a low-pass filter), and at 2x or less plain bilinear already
  averages the 2 x 2 neighbourhood of each output pixel. The antialiased kernel costs as much as the
  decode.
  """
  size = tf.stack([height, width])
  shape = tf.shape(image)
  large = tf.logical_or(shape[0] > 2 * height, shape[1] > 2 * width)
  return tf.cond(
    large,
    lambda: tf.image.resize(image, size, method="bilinear", antialias=True),
    lambda: tf.image.resize(image, size, method="bilinear"),
  )


def _decode(data: tf.Tensor, scale: tf.Tensor) -> tf.Tensor:
  """uint8 [h', w', 3]: JPEG at 1/scale (`preprocess.JPEG_SCALES`), anything else at full size."""

  def jpeg(ratio):
    return lambda: tf.io.decode_jpeg(data, channels=3, ratio=ratio)

  full = lambda: tf.io.decode_image(data, channels=3, expand_animations=False)  # noqa: E731
  branch = tf.argmax(tf.cast(tf.equal(scale, preprocess.JPEG_SCALES), tf.int32), output_type=tf.int32)
  return tf.switch_case(branch, [full] + [jpeg(r) for r in preprocess.JPEG_SCALES[1:]])


def pad(x: tf.Tensor, size: int, value: tf.Tensor) -> tf.Tensor:
  """float32 [h,w,3] -> [size,size,3], centred; the border filled with `value` [3] (only the border
  is written besides the one copy of x: a broadcast over every pixel costs more than the copy)."""
  h, w = tf.shape(x)[0], tf.shape(x)[1]
  top, left = (size - h) // 2, (size - w) // 2
  band = lambda rows, cols: tf.broadcast_to(value, tf.stack([rows, cols, 3]))  # noqa: E731
  middle = tf.concat([band(h, left), x, band(h, size - w - left)], axis=1)
  return tf.concat([band(top, size), middle, band(size - h - top, size)], axis=0)


def _one(args, *, options: preprocess.ImageOptions) -> tf.Tensor:
  data, plan, params = args
  size = options.size
  pad_value = tf.constant(options.pad_value, tf.float32)

  def image():
    x = augment(resize(_decode(data, plan[0]), plan[1], plan[2]), params)
    return tf.ensure_shape(pad(x, size, pad_value), [size, size, 3])

  return tf.cond(tf.strings.length(data) > 0, image, lambda: tf.zeros([size, size, 3]))


def render(
  data: tf.Tensor, plan: tf.Tensor, params: tf.Tensor, options: preprocess.ImageOptions
) -> tf.Tensor:
  """data string [...], plan int32 [..., 3], params float32 [..., 4] -> float32 [..., S, S, 3]."""
  shape = tf.shape(data)
  flat = (tf.reshape(data, [-1]), tf.reshape(plan, [-1, 3]), tf.reshape(params, [-1, 4]))
  size = options.size
  one = functools.partial(_one, options=options)
  if data.shape.num_elements() == 1:  # pairs: no loop
    out = one(tuple(v[0] for v in flat))[None]
  else:
    out = tf.map_fn(one, flat, fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))
  return tf.reshape(out, tf.concat([shape, [size, size, 3]], 0))


@functools.lru_cache(maxsize=16)
def _eager(options: preprocess.ImageOptions):
  return tf.function(functools.partial(render, options=options), reduce_retracing=True)


def render_example(example: dict, options: preprocess.ImageOptions) -> dict[str, np.ndarray]:
  """An example with planned images (`preprocess.PLAN_KEYS`) -> the same with 'images' float32 [N,F,S,S,3]."""
  out = {k: v for k, v in example.items() if k not in preprocess.PLAN_KEYS}
  data = tf.constant(example["image_data"].tolist())  # nested lists: numpy's bytes dtype drops trailing NULs
  out["images"] = _eager(options)(data, example["image_plan"], example["image_augment"]).numpy()
  return out


def load_image(
  data: bytes, *, missing: bool, path: str, options: preprocess.ImageOptions, augment=None
) -> np.ndarray:
  """Encoded bytes -> float32 [S,S,3] in [0,1] (raises Dropped on bad input): evaluation, generation."""
  plan = preprocess.plan_image(data, missing=missing, path=path, options=options, augment=augment)
  encoded, plan_row, params = plan.as_arrays()
  try:
    return _eager(options)(tf.constant([encoded]), plan_row[None], params[None]).numpy()[0]
  except tf.errors.InvalidArgumentError as e:  # a header PIL reads, a body TF's decoder rejects
    raise Dropped("corrupt_image", f"{path}: {e.message.splitlines()[0]}") from None
