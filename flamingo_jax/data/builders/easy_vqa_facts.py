"""Facts, captions, documents and clips derived deterministically from the easy-VQA package.

easy-VQA (PyPI `easy-vqa`) has 64x64 RGB images of one coloured shape on a light noisy background and
yes/no, colour and shape questions about them (`[question, answer, image_id]` triples). Per image we
derive:

* colour (8: red, green, blue, yellow, teal, brown, gray, black) and shape (circle, rectangle, triangle)
  from the questions: answers to "what color/shape ..." questions, the colour/shape named in
  "what is the blue shape?"/"what color is the circle?", and the colour/shape word of a yes/no question
  whose answer, flipped by a "not"/"no" in it, is yes. About 10% of images lack one of the two in their
  questions: then it is read from the pixels (the shapes are drawn in exact CSS colours; the shape
  from the fill ratio of its bounding box: ~1.0 rectangle, ~0.8 circle, ~0.55 triangle).
* size from the pixels: the fraction of foreground pixels (differing from the corner colour by more
  than 60 in summed RGB): below 4% "small", above 12% "large", else no size word.

Caption: "a small blue rectangle" (size word optional). All choices below are keyed by CRC32 of
strings, so they never depend on a random generator's version.
"""

import dataclasses
import zlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

COLORS = {
  "red": (255, 0, 0),
  "green": (0, 255, 0),
  "blue": (0, 0, 255),
  "yellow": (255, 255, 0),
  "teal": (0, 128, 128),
  "brown": (165, 42, 42),
  "gray": (128, 128, 128),
  "black": (0, 0, 0),
}
SHAPES = ("circle", "rectangle", "triangle")
SMALL, LARGE = 0.04, 0.12  # foreground fraction thresholds of the size word
MOTIONS = ("zooms in on", "zooms out from", "pans left across", "pans right across")
_NEGATIONS = ("not", "no")


@dataclasses.dataclass(frozen=True)
class Facts:
  """What one image shows, and its questions."""

  color: str
  shape: str
  size: str  # 'small', 'large' or '' (medium)
  questions: tuple[tuple[str, str], ...] = ()  # (question, answer)

  @property
  def caption(self) -> str:
    return " ".join(w for w in ("a", self.size, self.color, self.shape) if w)


def pick(n: int, *keys) -> int:
  """A deterministic choice in [0, n) keyed by `keys`."""
  return zlib.crc32(repr(keys).encode()) % n


def facts_from_questions(questions: Sequence[tuple[str, str]]) -> tuple[str | None, str | None]:
  """(colour, shape) stated by an image's questions; None where they do not tell."""
  colors, shapes = set(), set()
  for question, answer in questions:
    words = question.rstrip("?").split()
    if answer in COLORS:
      colors.add(answer)
      shapes.update(w for w in words if w in SHAPES)
    elif answer in SHAPES:
      shapes.add(answer)
      colors.update(w for w in words if w in COLORS)
    elif answer in ("yes", "no"):
      present = (answer == "yes") != any(w in _NEGATIONS for w in words)
      if present:
        colors.update(w for w in words if w in COLORS)
        shapes.update(w for w in words if w in SHAPES)
  return (min(colors) if colors else None), (min(shapes) if shapes else None)


def _foreground(pixels: np.ndarray) -> np.ndarray:
  """bool [H,W]: pixels differing from the top-left (background) colour."""
  diff = np.abs(pixels.astype(np.int32) - pixels[0, 0].astype(np.int32)).sum(-1)
  return diff > 60


def size_from_pixels(pixels: np.ndarray) -> str:
  """'small', 'large' or '' from uint8 [H,W,3] pixels."""
  fraction = _foreground(pixels).mean()
  return "small" if fraction < SMALL else "large" if fraction > LARGE else ""


def color_from_pixels(pixels: np.ndarray) -> str | None:
  """The palette colour of the pixel farthest from the background, if exact."""
  diff = np.abs(pixels.astype(np.int32) - pixels[0, 0].astype(np.int32)).sum(-1)
  y, x = np.unravel_index(np.argmax(diff), diff.shape)
  rgb = tuple(int(v) for v in pixels[y, x])
  return next((name for name, c in COLORS.items() if c == rgb), None)


def shape_from_pixels(pixels: np.ndarray) -> str | None:
  """Shape from the fill ratio of the foreground's bounding box."""
  fg = _foreground(pixels)
  ys, xs = np.nonzero(fg)
  if not len(ys):
    return None
  fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
  return "triangle" if fill < 0.7 else "circle" if fill < 0.92 else "rectangle"


def image_facts(pixels: np.ndarray, questions: Sequence[tuple[str, str]]) -> Facts:
  """Facts of one image (uint8 [H,W,3]) from its questions, falling back to its pixels."""
  color, shape = facts_from_questions(questions)
  color = color or color_from_pixels(pixels) or ""
  shape = shape or shape_from_pixels(pixels) or "shape"
  return Facts(color=color, shape=shape, size=size_from_pixels(pixels), questions=tuple(questions))


def document_groups(image_ids: Sequence[int], split: str) -> list[list[int]]:
  """Image ids shuffled (by CRC32) and cut into documents of 2-5 images; a last single is dropped."""
  order = sorted(image_ids, key=lambda i: (zlib.crc32(f"{split}:{i}".encode()), i))
  groups, start = [], 0
  while start < len(order) - 1:
    size = 2 + pick(4, split, "size", len(groups))
    groups.append(order[start : start + size])
    start += size
  return [g for g in groups if len(g) >= 2]


def document_text(image_ids: Sequence[int], facts: dict[int, Facts], split: str) -> str:
  """ "<image> This is a red circle. <image>Question: is there a triangle? Answer: no" for the images.

  Per image (keyed by CRC32): one of its questions with the answer (3 in 4), written exactly as a
  support example of the few-shot VQA prompt (`eval/prompting.py`: "<image>Question: {q} Answer:
  {a}", its `<EOC>` added by the interleaved pipeline), else a description. So a document is, like a
  web page of M3W, a run of images with text about each, and several in a row form a few-shot prompt.
  """
  parts = []
  for i in image_ids:
    f = facts[i]
    if f.questions and pick(4, split, "kind", i) != 0:
      q, a = f.questions[pick(len(f.questions), split, "question", i)]
      parts.append(f"<image>Question: {q} Answer: {a}")
    else:
      parts.append(f"<image> This is {f.caption}.")
  return " ".join(parts)


def motion_of(image_id: int) -> str:
  return MOTIONS[image_id % len(MOTIONS)]


def clip_frames(image: Image.Image, motion: str, num_frames: int) -> list[Image.Image]:
  """`num_frames` frames of a virtual camera move over `image`, each the image's size.

  Frame t (u = t / (F-1) in [0, 1]) is a crop resized (bilinear) back to full size:
    'zooms in on':      centred square crop of side 1 - 0.4 u (of the image side);
    'zooms out from':   centred square crop of side 0.6 + 0.4 u;
    'pans left across': crop of side 0.7, vertically centred, left edge at 0.3 (1 - u);
    'pans right across': the same with the left edge at 0.3 u.
  """
  w, h = image.size
  frames = []
  for t in range(num_frames):
    u = t / max(num_frames - 1, 1)
    if motion in MOTIONS[:2]:
      side = 1 - 0.4 * u if motion == MOTIONS[0] else 0.6 + 0.4 * u
      x0 = y0 = (1 - side) / 2
    elif motion in MOTIONS[2:]:
      side, y0 = 0.7, 0.15
      x0 = 0.3 * (1 - u) if motion == MOTIONS[2] else 0.3 * u
    else:
      raise ValueError(f"unknown motion {motion!r}; expected one of {MOTIONS}")
    box = (x0 * w, y0 * h, (x0 + side) * w, (y0 + side) * h)
    frames.append(image.resize((w, h), Image.Resampling.BILINEAR, box=box))
  return frames
