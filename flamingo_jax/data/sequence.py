"""Token sequences -> the text arrays of one example; drop reasons shared by all pipelines.

Shapes: T tokens (a dataset's `max_tokens`), N media per sequence, F frames, S image side.

A sequence `seq` of L <= T+1 ids (e.g. `[BOS, <image>, a, cat, EOC, EOS]`) gives, padded to T:
  tokens     = seq[:-1]   (the model's inputs; the last id is only a target)
  targets    = seq[1:]    (next token)
  token_mask = t < L-1    (real input positions)
  loss_mask  = token_mask and targets != <image>: the loss covers every text token, `<EOC>` and
               `<EOS>` (as in the paper), never padding and never the `<image>` marker as a target
               (where images sit is given, not predicted).
  media_index (phi) = index of the last `<image>` at or before t (the marker attends to its own image),
               -1 before the first; with `attend_next` (the paper's p_next augmentation) the first
               `<image>` at or after t instead, -1 after the last. -1 on padding. This is exactly
               `flamingo_jax.models.masking.media_index_from_tokens` on the real positions.
"""

import numpy as np

from flamingo_jax.models import masking

# Why an example is dropped (code = index + 1; 0 = kept).
DROP_REASONS = (
  "missing_image",  # an image/frame file could not be read when the dataset was built
  "empty_image",  # a zero-byte image file
  "corrupt_image",  # undecodable image bytes (truncated, not an image, decompression bomb)
  "no_image",  # a document or clip without any image
  "no_image_in_budget",  # no image left within the token budget
  "image_count_mismatch",  # `<image>` markers in the text != number of images
  "text_too_long",  # a caption that does not fit in max_tokens
  "empty_text",  # a caption/document without text
  "bad_example",  # anything else unexpected (the error is logged)
  "small_image",  # an image's shorter side under `ImageOptions.min_side` (App. A.3: 64 px)
  "extreme_aspect",  # an image's aspect ratio above `ImageOptions.max_aspect` (App. A.3: 3)
)
# What was cut from a kept example (bit i of the notes).
NOTES = ("truncated_tokens", "truncated_images")


class Dropped(Exception):
  """An example is dropped: `reason` (one of DROP_REASONS) and a detail naming the file."""

  def __init__(self, reason: str, detail: str):
    if reason not in DROP_REASONS:
      raise ValueError(f"unknown drop reason {reason!r}; expected one of {DROP_REASONS}")
    super().__init__(f"{reason}: {detail}")
    self.reason = reason
    self.detail = detail


def reason_code(reason: str) -> int:
  return DROP_REASONS.index(reason) + 1


def note_bits(*notes: str) -> int:
  return sum(1 << NOTES.index(n) for n in notes)


def media_index(tokens: np.ndarray, image_id: int, attend_next: bool, length: int) -> np.ndarray:
  """phi, int32 [T], for the first `length` positions of `tokens` (int [T]); -1 elsewhere."""
  out = np.full(tokens.shape, -1, np.int32)
  out[:length] = masking.media_index_from_tokens(np.asarray(tokens[None, :length]), image_id, attend_next)[0]
  return out


def text_arrays(
  seq: list[int],
  *,
  max_tokens: int,
  pad_id: int,
  image_id: int,
  attend_next: bool = False,
  loss_flags: list[bool] | None = None,
) -> dict[str, np.ndarray]:
  """tokens/targets int32 [T], loss_mask f32 [T], media_index int32 [T], token_mask bool [T].

  `loss_flags` (one per id of `seq`): the loss further limited to the targets flagged True.
  """
  if not 2 <= len(seq) <= max_tokens + 1:
    raise ValueError(f"sequence of {len(seq)} ids; need 2..{max_tokens + 1}")
  n = len(seq) - 1
  tokens = np.full([max_tokens], pad_id, np.int32)
  targets = np.full([max_tokens], pad_id, np.int32)
  tokens[:n] = seq[:-1]
  targets[:n] = seq[1:]
  token_mask = np.arange(max_tokens) < n
  loss_mask = token_mask & (targets != image_id)
  if loss_flags is not None:
    if len(loss_flags) != len(seq):
      raise ValueError(f"{len(loss_flags)} loss flags for a sequence of {len(seq)} ids")
    loss_mask[:n] &= np.asarray(loss_flags[1:], bool)
  loss_mask = loss_mask.astype(np.float32)
  return {
    "tokens": tokens,
    "targets": targets,
    "loss_mask": loss_mask,
    "media_index": media_index(tokens, image_id, attend_next, n),
    "token_mask": token_mask,
  }


def empty_example(*, max_tokens: int, max_images: int, num_frames: int, pad_id: int) -> dict[str, np.ndarray]:
  """The stand-in for a dropped example: no media (empty image plans, `preprocess.plan_arrays`), no
  real tokens, no loss."""
  return {
    "image_data": np.full([max_images, num_frames], b"", object),
    "image_plan": np.zeros([max_images, num_frames, 3], np.int32),
    "image_augment": np.zeros([max_images, num_frames, 4], np.float32),
    "media_mask": np.zeros([max_images], bool),
    "tokens": np.full([max_tokens], pad_id, np.int32),
    "targets": np.full([max_tokens], pad_id, np.int32),
    "loss_mask": np.zeros([max_tokens], np.float32),
    "media_index": np.full([max_tokens], -1, np.int32),
    "token_mask": np.zeros([max_tokens], bool),
  }


def as_text(value) -> str:
  """A TFDS text feature (bytes) as str."""
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
