"""Video-text pairs (VTP-like): one clip -> arrays of a batch row.

Shapes: T max_tokens, F frames per clip (`num_frames`), S image side; one media item (N=1).

A clip is its frames (image files, in time order). F frames are taken at evenly spaced indices
`round(linspace(0, n-1, F))` of the n stored frames (frames repeat when n < F); in training, when
n > F, they are spaced over a window of ceil(n F / (F+1)) frames that starts at a random frame.
All F frames share one augmentation draw. The text is paired as in `pairs.py`:
`<BOS><image>{text}<EOC><EOS>` (leading space with p=0.5 in training). A clip with no frames is
dropped ('no_image'); one bad frame drops the clip (with that frame's reason).
"""

from collections.abc import Mapping
from typing import Any

import numpy as np

from flamingo_jax.data import pairs, preprocess, sequence
from flamingo_jax.data.sequence import Dropped


def frame_indices(n: int, num_frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """int [F] indices into n frames: evenly spaced; with rng, shifted by a random offset."""
  if n < 1:
    raise ValueError("a clip needs at least one frame")
  if rng is None or n <= num_frames:
    return np.round(np.linspace(0, n - 1, num_frames)).astype(np.int64)
  # Evenly spaced over a window of `span` frames placed at a random start.
  span = max(num_frames, int(np.ceil(n * num_frames / (num_frames + 1))))
  start = int(rng.integers(0, n - span + 1))
  return start + np.round(np.linspace(0, span - 1, num_frames)).astype(np.int64)


def process_clip(
  example: Mapping[str, Any],
  rng: np.random.Generator | None,
  *,
  tokenizer,
  image_options: preprocess.ImageOptions,
  max_tokens: int,
  num_frames: int,
  text_template: str = "{text}",
  p_next: float = 0.0,
  **unused,
) -> tuple[dict[str, np.ndarray], int]:
  """One clip -> ({planned images [1,F] (`preprocess.plan_arrays`), media_mask [1], text arrays [T]},
  notes); rng None = eval.

  Raises Dropped for a bad example.
  """
  del unused
  frames = list(example["frames"])
  paths = [sequence.as_text(p) for p in example["frame_paths"]]
  missing = [bool(m) for m in example["frame_missing"]]
  where = paths[0] if paths else "<clip without frames>"
  if not frames:
    raise Dropped("no_image", where)
  text = pairs.fill_template(example, text_template, where)
  leading_space = rng is not None and rng.random() < 0.5
  seq = pairs.caption_sequence(
    text, tokenizer, leading_space=leading_space, max_tokens=max_tokens, where=where
  )
  indices = frame_indices(len(frames), num_frames, rng)
  augment = preprocess.Augment.draw(rng, image_options) if rng is not None else None
  planned = {
    int(i): preprocess.plan_image(
      frames[i], missing=missing[i], path=paths[i], options=image_options, augment=augment
    )
    for i in sorted(set(indices.tolist()))
  }
  attend_next = rng is not None and p_next > 0 and rng.random() < p_next
  arrays = sequence.text_arrays(
    seq, max_tokens=max_tokens, pad_id=tokenizer.pad_id, image_id=tokenizer.image_id, attend_next=attend_next
  )
  plans = [[planned[int(i)] for i in indices]]
  return {**preprocess.plan_arrays(plans), "media_mask": np.ones([1], bool), **arrays}, 0
