"""Images, host side: check and plan each image in Python; `render.py` decodes it with TF ops.

Shapes: S the output side (`ImageOptions.size`), h, w the resized image (max(h, w) == S).

Per image, `plan_image` reads only the encoded header (format, size, mode, EXIF orientation) and
returns a `Plan`: the bytes TensorFlow's decoders render exactly as the image, the JPEG DCT scale to
decode at (the smallest that still covers the resized image), the resized (h, w), and the
augmentation draw. `render.render` then decodes, resizes (bilinear, antialiased), augments and pads
inside tf.data, so the per-pixel work never runs in Python.

What TF's decoders would get wrong goes through PIL here and is re-encoded as PNG at its resized size
(rare: web images are mostly 8-bit RGB or grey JPEG / PNG): alpha (RGBA, LA, palette transparency)
composited on white; 16/32-bit grey scaled to 8 bits; CMYK, palette-less exotic modes and other
formats (GIF, WEBP, TIFF, BMP) to RGB; an EXIF orientation applied; and any file whose end is not
where its format says it ends (a truncated download), which PIL then either decodes or rejects.
Undecodable bytes raise `Dropped` ('corrupt_image'), as do missing ('missing_image') and zero-byte
('empty_image') files, and, where the options ask for the paper's filters, small ('small_image') and
elongated ('extreme_aspect') images.

Training augmentation (`rng` given): a random horizontal flip (p=0.5) and colour jitter: brightness
+U(-b, b), contrast x U(1-c, 1+c) around the image mean, saturation x U(1-s, 1+s) around the
luma (in that order, then clipped to [0,1]). It applies to the image before padding, so the padding
stays `pad_value`. The frames of one clip share one draw of the augmentation.
"""

import dataclasses
import io
from collections.abc import Iterable

import numpy as np
from PIL import Image, ImageOps

from flamingo_jax.data.sequence import Dropped

LUMA = (0.299, 0.587, 0.114)
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "HEIF")
_EXIF_ORIENTATION = 0x0112
JPEG_SCALES = (1, 2, 4, 8)  # the DCT scalings libjpeg decodes at (TF's `decode_jpeg(ratio=...)`)
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}  # how a complete file ends
_TAIL = 64  # bytes after the end marker still taken as padding (longer trailers go through PIL)
PLAN_KEYS = ("image_data", "image_plan", "image_augment")  # an example's planned images


@dataclasses.dataclass(frozen=True)
class ImageOptions:
  """size: output side S; pad_value: RGB in [0,1]; flip .. saturation: training augmentation (0 = off);
  min_side, max_aspect: the paper's image filters (App. A.3: 64 px, 3; 0 = off), on the stored size."""

  size: int = 320
  pad_value: tuple[float, float, float] = (0.5, 0.5, 0.5)
  flip: bool = True
  brightness: float = 0.1
  contrast: float = 0.1
  saturation: float = 0.1
  min_side: int = 0
  max_aspect: float = 0.0


@dataclasses.dataclass(frozen=True)
class Augment:
  """One draw of the training augmentation (`render.augment` applies it)."""

  flip: bool = False
  brightness: float = 0.0
  contrast: float = 1.0
  saturation: float = 1.0

  @classmethod
  def draw(cls, rng: np.random.Generator | None, options: ImageOptions) -> "Augment":
    if rng is None:
      return cls()
    u = rng.uniform(-1.0, 1.0, size=3)
    return cls(
      flip=bool(options.flip and rng.random() < 0.5),
      brightness=float(u[0] * options.brightness),
      contrast=float(1.0 + u[1] * options.contrast),
      saturation=float(1.0 + u[2] * options.saturation),
    )

  def as_array(self) -> np.ndarray:
    """float32 [4]: flip (0/1), brightness, contrast, saturation."""
    return np.array([float(self.flip), self.brightness, self.contrast, self.saturation], np.float32)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How `render` makes one image: decode `data` at 1/`scale` (JPEG DCT scaling; 1 otherwise),
  resize to [height, width], augment, pad. `data` empty = an unused media slot (zeros)."""

  data: bytes = b""
  scale: int = 1
  height: int = 0
  width: int = 0
  augment: Augment = Augment()

  def as_arrays(self) -> tuple[bytes, np.ndarray, np.ndarray]:
    """(data, int32 [3] = scale, height, width, float32 [4] augmentation): one slot of an example."""
    return self.data, np.array([self.scale, self.height, self.width], np.int32), self.augment.as_array()


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB (alpha composited on white, high bit depths scaled to 8 bits)."""
  mode = image.mode
  if mode == "RGB" and "transparency" not in image.info:
    return image
  if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  if mode.startswith("I") or mode == "F":
    x = np.asarray(image, dtype=np.float32)
    if x.max(initial=0) > 255:
      x = x / 257.0 if x.max() <= 65535 else x * (255.0 / x.max())
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8), "L").convert("RGB")
  return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def check_shape(size: tuple[int, int], *, path: str, min_side: int, max_aspect: float) -> None:
  """Raises Dropped for a stored (w, h) that the paper's filters remove: too small or too elongated."""
  w, h = size
  if min_side and min(w, h) < min_side:
    raise Dropped("small_image", f"{path}: {w}x{h} px, under {min_side} px")
  if max_aspect and max(w, h) > max_aspect * min(w, h):
    raise Dropped("extreme_aspect", f"{path}: {w}x{h} px, aspect ratio above {max_aspect}")


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(w, h) with the longer side == size, aspect ratio kept (each side >= 1)."""
  scale = size / max(width, height)
  return max(1, round(width * scale)), max(1, round(height * scale))


def _open(data: bytes, *, missing: bool, path: str, min_side: int, max_aspect: float) -> Image.Image:
  """The lazily opened image (header read, pixels not decoded); raises Dropped for bad bytes."""
  if missing:
    raise Dropped("missing_image", path)
  if not data:
    raise Dropped("empty_image", path)
  try:
    image = Image.open(io.BytesIO(data))
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise Dropped("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
  check_shape(image.size, path=path, min_side=min_side, max_aspect=max_aspect)
  return image


def decode(
  data: bytes, *, missing: bool, path: str, size: int, min_side: int = 0, max_aspect: float = 0.0
) -> Image.Image:
  """Encoded bytes -> an RGB PIL image, decoded in Python (JPEGs at the smallest scale that covers
  the resized image: longer side >= size). The filters (`check_shape`) see the stored size."""
  image = _open(data, missing=missing, path=path, min_side=min_side, max_aspect=max_aspect)
  try:
    w, h = image.size
    image.draft("RGB", resized_size(w, h, size))
    if image.format in _EXIF_FORMATS:  # PNG/GIF carry no orientation in practice; skip the parse
      image = ImageOps.exif_transpose(image)
    image.load()
    image = to_rgb(image)
  except Exception as e:  # pylint: disable=broad-except
    raise Dropped("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
  if min(image.size) < 1:
    raise Dropped("corrupt_image", f"{path}: empty image {image.size}")
  return image


def resize(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> uint8 [h,w,3] with its longer side == size (aspect ratio kept)."""
  new = resized_size(*image.size, size)
  if new != image.size:
    image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=2.0)
  return np.asarray(image, dtype=np.uint8)


def _tf_decodes_exactly(image: Image.Image, data: bytes) -> bool:
  """Whether TF's JPEG/PNG decoders with channels=3 give this image's RGB pixels: an 8-bit RGB,
  grey or opaque-palette JPEG/PNG, upright, and complete (its end marker within the last bytes)."""
  fmt = "JPEG" if image.format == "MPO" else image.format
  if fmt not in END_MARKERS or image.mode not in ("RGB", "L", "P") or "transparency" in image.info:
    return False
  if fmt == "JPEG" and image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
    return False
  end = data.rfind(END_MARKERS[fmt])
  return end >= 0 and len(data) - end <= _TAIL


def jpeg_scale(width: int, height: int, target: tuple[int, int]) -> int:
  """The largest DCT scale whose decoded size, ceil(side / scale), still covers `target` (w, h)."""
  return max(s for s in JPEG_SCALES if -(-width // s) >= target[0] and -(-height // s) >= target[1])


def plan_image(
  data: bytes, *, missing: bool, path: str, options: ImageOptions, augment: Augment | None = None
) -> Plan:
  """How to render one image (raises Dropped on bad input). Reads only the header, except for the
  images TF would not decode exactly, which PIL decodes here and hands on as a resized PNG."""
  o = options
  image = _open(data, missing=missing, path=path, min_side=o.min_side, max_aspect=o.max_aspect)
  augment = augment or Augment()
  w, h = image.size
  target = resized_size(w, h, o.size)
  if _tf_decodes_exactly(image, data):
    scale = jpeg_scale(w, h, target) if image.format in ("JPEG", "MPO") else 1
    return Plan(data, scale, target[1], target[0], augment)
  pixels = resize(decode(data, missing=False, path=path, size=o.size), o.size)
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="PNG", compress_level=1)
  return Plan(buf.getvalue(), 1, pixels.shape[0], pixels.shape[1], augment)


def plan_arrays(plans: list[list[Plan]]) -> dict[str, np.ndarray]:
  """[N][F] `Plan`s -> the example's planned images: image_data object [N,F] (bytes), image_plan
  int32 [N,F,3], image_augment float32 [N,F,4] (what `render.render` takes)."""
  n, f = len(plans), len(plans[0])
  data = np.empty([n, f], object)
  plan = np.zeros([n, f, 3], np.int32)
  params = np.zeros([n, f, 4], np.float32)
  for i, row in enumerate(plans):
    for j, p in enumerate(row):
      data[i, j], plan[i, j], params[i, j] = p.as_arrays()
  return dict(zip(PLAN_KEYS, (data, plan, params)))


def mean_colour(encoded: Iterable[bytes], *, side: int = 32) -> tuple[float, float, float]:
  """The mean RGB in [0,1] of the images that decode among `encoded` (each resized to `side` first,
  so every image weighs the same); mid-grey when none does. For padding with the dataset's mean
  colour (App. A.3)."""
  sums, count = np.zeros(3), 0
  for data in encoded:
    try:
      image = decode(data, missing=False, path="mean_colour", size=side)
    except Dropped:
      continue
    sums += resize(image, side).reshape(-1, 3).mean(0) / 255.0
    count += 1
  return tuple(float(v) for v in sums / count) if count else (0.5, 0.5, 0.5)
