"""Images: decode, to RGB, resize keeping the aspect ratio, pad, augment (training only).

Shapes: S the output side (`ImageOptions.size`), h, w the resized image (max(h, w) == S).

`load_image` returns float32 [S,S,3] in [0,1]: the image resized (bilinear, antialiased) so that its
longer side is S, centred, and padded with `pad_value` (default 0.5 grey; `mean_colour` gives a
dataset's mean, as the paper pads). Modes:
grayscale/palette/CMYK/YCbCr -> RGB; alpha (RGBA, LA, palette transparency) is composited on white;
16/32-bit grayscale is scaled to 8 bits; the EXIF orientation is applied. Undecodable bytes raise
`Dropped` ('corrupt_image'), as do missing ('missing_image') and zero-byte ('empty_image') files, and,
where the options ask for the paper's filters, small ('small_image') and elongated ('extreme_aspect')
images.

Training augmentation (`rng` given): a random horizontal flip (p=0.5) and colour jitter: brightness
+U(-b, b), contrast x U(1-c, 1+c) around the image mean, saturation x U(1-s, 1+s) around the
luma (in that order, then clipped to [0,1]). It applies to the image before padding, so the padding
stays `pad_value`. The frames of one clip share one draw of the augmentation.
"""

import dataclasses
import io
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image, ImageOps

from flamingo_jax.data.sequence import Dropped

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_EXIF_FORMATS = ("JPEG", "MPO", "TIFF", "WEBP", "HEIF")


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
  """One draw of the training augmentation."""

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

  def __call__(self, x: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """[h,w,3] pixels times `scale` (float32 in [0,1], or uint8 with scale 1/255) -> float32 [h,w,3]
    in [0,1].

    brightness x + d, contrast c (x - m) + m with m the mean luma (after brightness), saturation
    s (x - l) + l with l the pixel's luma: all affine, so applied as one x @ A + b (the scale folded
    into A, one pass over the pixels), then clipped.
    """
    if self.flip:
      x = x[:, ::-1]
    if (self.brightness, self.contrast, self.saturation) == (0.0, 1.0, 1.0):
      return (
        x if scale == 1.0 and x.dtype == np.float32 else np.multiply(x, np.float32(scale), dtype=np.float32)
      )
    d, c, s = self.brightness, self.contrast, self.saturation
    pixels = x.reshape(-1, 3)  # one [h*w, 3] matmul, not h small ones
    mean = float((pixels @ (_LUMA * np.float32(scale))).mean()) + d  # luma weights sum to 1
    luma = np.repeat(_LUMA[:, None], 3, axis=1)  # x @ luma = the luma in every channel
    a = (s * np.eye(3, dtype=np.float32) + (1 - s) * luma) * np.float32(c * scale)
    b = np.float32(c * d + (1 - c) * mean)  # a constant grey: saturation keeps it
    out = pixels @ a
    out += b
    return np.clip(out, 0.0, 1.0, out=out).reshape(x.shape)


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


def decode(
  data: bytes, *, missing: bool, path: str, size: int, min_side: int = 0, max_aspect: float = 0.0
) -> Image.Image:
  """Encoded bytes -> an RGB PIL image (JPEGs decoded at the smallest scale that covers the resized
  image: longer side >= size). The filters
  (`check_shape`) see the stored size, before any reduced-scale decoding."""
  if missing:
    raise Dropped("missing_image", path)
  if not data:
    raise Dropped("empty_image", path)
  try:
    image = Image.open(io.BytesIO(data))
    check_shape(image.size, path=path, min_side=min_side, max_aspect=max_aspect)
    # JPEG: decode at the smallest scale that still covers the resized image (longer side = size).
    w, h = image.size
    image.draft("RGB", (max(1, round(w * size / max(w, h))), max(1, round(h * size / max(w, h)))))
    if image.format in _EXIF_FORMATS:  # PNG/GIF carry no orientation in practice; skip the parse
      image = ImageOps.exif_transpose(image)
    image.load()
    image = to_rgb(image)
  except Dropped:
    raise
  except Exception as e:  # pylint: disable=broad-except  (PIL raises many kinds)
    raise Dropped("corrupt_image", f"{path}: {type(e).__name__}: {e}") from None
  if min(image.size) < 1:
    raise Dropped("corrupt_image", f"{path}: empty image {image.size}")
  return image


def resize(image: Image.Image, size: int) -> np.ndarray:
  """RGB image -> uint8 [h,w,3] with its longer side == size (aspect ratio kept)."""
  w, h = image.size
  scale = size / max(w, h)
  new = (max(1, round(w * scale)), max(1, round(h * scale)))
  if new != (w, h):
    image = image.resize(new, Image.Resampling.BILINEAR, reducing_gap=2.0)
  return np.asarray(image, dtype=np.uint8)


def pad(x: np.ndarray, size: int, pad_value: Sequence[float]) -> np.ndarray:
  """float32 [h,w,3] -> float32 [size,size,3], centred, padded with pad_value."""
  h, w = x.shape[:2]
  if (h, w) == (size, size):
    return x.astype(np.float32, copy=False)
  out = np.empty([size, size, 3], np.float32)
  top, left = (size - h) // 2, (size - w) // 2
  fill = np.asarray(pad_value, np.float32)
  # Only the border takes the pad value: the image covers the rest.
  out[:top], out[top + h :], out[top : top + h, :left], out[top : top + h, left + w :] = (
    fill,
    fill,
    fill,
    fill,
  )
  out[top : top + h, left : left + w] = x
  return out


def load_image(
  data: bytes, *, missing: bool, path: str, options: ImageOptions, augment: Augment | None = None
) -> np.ndarray:
  """Encoded bytes -> float32 [S,S,3] in [0,1] (raises Dropped on bad input)."""
  o = options
  image = decode(data, missing=missing, path=path, size=o.size, min_side=o.min_side, max_aspect=o.max_aspect)
  x = resize(image, o.size)  # uint8
  x = (augment or Augment())(x, scale=1.0 / 255.0)
  return pad(x, options.size, options.pad_value)


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
