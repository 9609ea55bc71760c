"""Interleaved image-text documents (M3W-like): one document -> arrays of a batch row.

Shapes: T max_tokens (256 in the paper), N max_images (5 in the paper), S image side; F=1.

A stored document is a text with one `<image>` marker per image (see `builders/jsonl.py`). Its
sequence: `<BOS>`, then the text chunks and images in order, with `<EOC>` closing every text chunk
that is followed by an image and at the end, then `<EOS>`:
  "A cat. <image> It sleeps." -> [BOS, A, cat, ., EOC, <image>, It, sleeps, ., EOC, EOS]
(the text before the first marker is stripped; a chunk after a marker keeps its leading space, which
is how a BPE tokenizer sees running text). Then:
  0. window (training with `window='random'`, App. A.3): a document longer than T+1 ids gives a random window
     `[BOS] + seq[1+s : s+T+1]`, s uniform over the starts whose window keeps an image with an id
     after it (so a document whose first image lies past id T+1 is still used); the window's images are
     the document's images from its first marker on. The BOS stays first: the frozen LM was trained with
     it there. Evaluation, `window='first'`, and any document that fits take s = 0 (and draw nothing
     from the rng). 'first' is for documents built so that each text follows its own image (easy-VQA):
     a window starting mid-document would train on answers whose image it cut off;
  1. token budget: the sequence is cut to its first T+1 ids (note 'truncated_tokens');
  2. image budget: with more than N markers left, the sequence is cut right before the (N+1)-th
     marker, so no token is left that would follow (and attend to) a dropped image
     (note 'truncated_images');
  3. trailing `<image>` markers (an image with no text after it) are removed.
The kept images are the first ones, one per kept marker; padded media slots are zeros with
media_mask False. Dropped: marker count != image count ('image_count_mismatch'), no image at all
('no_image'), no image left after the cuts ('no_image_in_budget'), no text ('empty_text'), or a bad
kept image (its reason). Images past the budget are never decoded. The paper's p_next (attend to
the next image, per sequence) is drawn with probability `p_next` in training.
"""

import bisect
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flamingo_jax.data import preprocess, sequence
from flamingo_jax.data.sequence import Dropped

IMAGE_MARKER = "<image>"
WINDOWS = ("random", "first")


def document_sequence(text: str, tokenizer, *, max_len: int) -> tuple[list[int], bool]:
  """(ids of the whole document or its first > max_len ids, whether it was longer than max_len)."""
  seq, _, longer = segment_sequence([(text, True)], tokenizer, max_len=max_len, markup_loss=True)
  return seq, longer


def segment_sequence(
  segments, tokenizer, *, max_len: int, markup_loss: bool
) -> tuple[list[int], list[bool], bool]:
  """(ids, loss flag per id, longer than max_len) of a document given as (text, loss) segments.

  The segments' texts concatenate to the document text; each text piece is tokenized on its own
  (split at word boundaries, this is the tokenization of the whole text for a BPE tokenizer) and
  its ids take its segment's flag. The `<EOC>`/`<EOS>` ids this function adds take `markup_loss`.
  """
  chunks = [[]]  # [(text, loss)] per stretch between markers
  for text, loss in segments:
    for j, part in enumerate(text.split(IMAGE_MARKER)):
      if j > 0:
        chunks.append([])
      chunks[-1].append((part, bool(loss)))
  seq, flags = [tokenizer.bos_id], [False]
  closed = (tokenizer.bos_id, tokenizer.eoc_id, tokenizer.image_id)

  def add(ids, flag):
    seq.extend(ids)
    flags.extend([flag] * len(ids))

  for i, pieces in enumerate(chunks):
    if i > 0:
      if seq[-1] not in closed:
        add([tokenizer.eoc_id], markup_loss)
      add([tokenizer.image_id], False)
    texts = [t for t, _ in pieces]
    if i == 0:
      texts[0] = texts[0].lstrip()
    texts[-1] = texts[-1].rstrip()
    if "".join(texts).strip():
      for t, (_, loss) in zip(texts, pieces):
        if t:
          add(tokenizer.encode(t), loss)
    if len(seq) > max_len:
      return seq, flags, True
  if seq[-1] not in closed:
    add([tokenizer.eoc_id], markup_loss)
  add([tokenizer.eos_id], markup_loss)
  return seq, flags, len(seq) > max_len


def window_starts(seq: Sequence[int], *, image_id: int, max_len: int, max_images: int) -> list[int]:
  """The starts s whose window `[BOS] + seq[1+s : s+max_len]` keeps an image followed by an id (see
  `truncate`: of the window's first `max_images` markers, one has its next id inside the window and
  that id is not a marker). [0] when the whole sequence fits in max_len ids."""
  width = max_len - 1  # ids after the BOS
  last = len(seq) - 1 - width
  if last <= 0:
    return [0]
  # Content coordinates: c = t - 1 for sequence index t >= 1.
  markers = [t - 1 for t in range(1, len(seq)) if seq[t] == image_id]
  starts = []
  for s in range(last + 1):
    first = bisect.bisect_left(markers, s)
    kept = markers[first : first + max_images]
    if any(m + 1 < s + width and seq[m + 2] != image_id for m in kept):
      starts.append(s)
  return starts


def truncate(seq: list[int], *, image_id: int, max_len: int, max_images: int) -> tuple[list[int], list[str]]:
  """Applies the token budget, the image budget and removes trailing markers; returns notes."""
  notes = []
  if len(seq) > max_len:
    seq = seq[:max_len]
    notes.append("truncated_tokens")
  markers = [t for t, token in enumerate(seq) if token == image_id]
  if len(markers) > max_images:
    seq = seq[: markers[max_images]]
    notes.append("truncated_images")
  while seq and seq[-1] == image_id:
    seq = seq[:-1]
  return seq, notes


def _document_ids(example, text, tokenizer, max_len, where):
  """(ids, loss flags) of a document; with `segments`, the loss falls on the flagged ones (bursty)."""
  if "segments" not in example:
    full, flags, _ = segment_sequence([(text, True)], tokenizer, max_len=max_len, markup_loss=True)
    return full, flags
  segments = [(sequence.as_text(t), bool(f)) for t, f in zip(example["segments"], example["segment_loss"])]
  if "".join(t for t, _ in segments) != text:
    raise Dropped("bad_example", f"{where}: the segments do not spell the document text")
  full, flags, _ = segment_sequence(segments, tokenizer, max_len=max_len, markup_loss=False)
  return full, flags


def _random_window(full, flags, rng, image_id, budget, max_images, where):
  """(ids, flags, index of the window's first image) of a uniform draw among `window_starts`; the rng
  is drawn only when there is a choice, so documents that fit see the same stream as before."""
  starts = window_starts(full, image_id=image_id, max_len=budget, max_images=max_images)
  if not starts:
    raise Dropped("no_image_in_budget", f"{where}: no window of {budget} ids keeps an image")
  start = starts[0] if len(starts) == 1 else int(starts[rng.integers(len(starts))])
  if not start:
    return full, flags, 0
  return full[:1] + full[1 + start :], flags[:1] + flags[1 + start :], full[1 : 1 + start].count(image_id)


def process_document(
  example: Mapping[str, Any],
  rng: np.random.Generator | None,
  *,
  tokenizer,
  image_options: preprocess.ImageOptions,
  max_tokens: int,
  max_images: int,
  p_next: float = 0.0,
  window: str = "random",
  **unused,
) -> tuple[dict[str, np.ndarray], int]:
  """One document -> ({planned images [N,1] (`preprocess.plan_arrays`), media_mask [N], text arrays
  [T]}, notes bits).

  rng None = eval (no augmentation, no p_next). Raises Dropped for a bad example.
  """
  del unused  # text_template, num_frames
  text = sequence.as_text(example["text"])
  images = list(example["images"])
  paths = [sequence.as_text(p) for p in example["image_paths"]]
  missing = [bool(m) for m in example["image_missing"]]
  where = paths[0] if paths else f'document "{text[:40]}"'
  markers = text.count(IMAGE_MARKER)
  if markers != len(images):
    raise Dropped("image_count_mismatch", f"{where}: {markers} <image> markers, {len(images)} images")
  if not images:
    raise Dropped("no_image", where)
  if not text.replace(IMAGE_MARKER, "").strip():
    raise Dropped("empty_text", where)
  budget = max_tokens + 1
  # Random training windows range over the whole document; otherwise only the first ids are needed.
  random_window = rng is not None and window == "random"
  full, flags = _document_ids(example, text, tokenizer, sys.maxsize if random_window else budget, where)
  first_image = 0
  if random_window:
    full, flags, first_image = _random_window(full, flags, rng, tokenizer.image_id, budget, max_images, where)
  seq, notes = truncate(full, image_id=tokenizer.image_id, max_len=budget, max_images=max_images)
  kept = seq.count(tokenizer.image_id)
  if kept == 0 or len(seq) < 2:
    raise Dropped("no_image_in_budget", f"{where}: no image in the first {budget} ids")
  plans = [[preprocess.Plan()] for _ in range(max_images)]  # unused slots render as zeros
  for n in range(first_image, first_image + kept):
    augment = preprocess.Augment.draw(rng, image_options) if rng is not None else None
    plans[n - first_image][0] = preprocess.plan_image(
      images[n], missing=missing[n], path=paths[n], options=image_options, augment=augment
    )
  attend_next = rng is not None and p_next > 0 and rng.random() < p_next
  arrays = sequence.text_arrays(
    seq,
    max_tokens=max_tokens,
    pad_id=tokenizer.pad_id,
    image_id=tokenizer.image_id,
    attend_next=attend_next,
    loss_flags=flags[: len(seq)],
  )
  media_mask = np.arange(max_images) < kept
  return {**preprocess.plan_arrays(plans), "media_mask": media_mask, **arrays}, sequence.note_bits(*notes)
