"""Video-text pairs from video files and a caption table (WebVid-style), decoded with PyAV on Beam.

A source is a CSV caption table with a header, one clip per row, either
  `video,text`                 the video file (relative to the table's folder unless absolute), or
  `videoid,page_dir,name`      WebVid's columns: the file is `{page_dir}/{videoid}.mp4`.
Each video is decoded with PyAV and sampled at 1 frame per second (the paper's VTP rate): the first
frame at or after t = 0, 1, 2, ... s. Frames are stored re-encoded as JPEG (quality 95), never as
pixels, in the layout of the other video builder (`jsonl.VideoTextJsonl`: frames, frame_paths,
frame_missing, text), so the same pipeline (`data/video.py`) samples F of them.

Prepared on Beam, one caption table per unit of work (`beam.py`; docs/DATA.md: split a large table into
parts). Bad rows are dropped and counted per cause (`info.metadata['dropped']`):
  missing_video      the video file cannot be read
  unsupported_codec  PyAV cannot open or decode it
  no_frames          it decodes to no frame
  empty_text         a blank caption
  duplicate_key      a video listed twice in one table (the first is kept)
A table past `max_bad_fraction` bad rows, or without the columns above, stops the build naming it.
Record keys are '<table name>/<video path>'. Config: `beam.beam_config(name, sources={split: tables})`.
"""

import csv
import io
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from flamingo_jax.data.builders import beam, common

CAUSES = ("missing_video", "unsupported_codec", "no_frames", "empty_text", "duplicate_key")
FRAMES_PER_SECOND = 1.0
JPEG_QUALITY = 95


def sample_frames(data: bytes, fps: float = FRAMES_PER_SECOND) -> list[np.ndarray]:
  """uint8 [h, w, 3] frames of an encoded video at `fps`: the first frame at or after each k / fps s."""
  import av  # pylint: disable=g-import-not-at-top  (the `data` extra)

  frames, next_time = [], 0.0
  with av.open(io.BytesIO(data)) as container:
    stream = container.streams.video[0]
    for frame in container.decode(stream):
      if frame.time is None or frame.time + 1e-6 < next_time:
        continue
      frames.append(frame.to_ndarray(format="rgb24"))
      next_time = (np.floor(frame.time * fps + 1e-6) + 1) / fps
  return frames


def encode_jpeg(frame: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
  return buf.getvalue()


def _rows(path: str) -> list[tuple[str, str]]:
  """(video path, caption) of each row of a caption table; InputError naming it when malformed."""
  try:
    with epath.Path(path).open("r") as f:
      reader = csv.DictReader(f)
      fields = set(reader.fieldnames or ())
      rows = list(reader)
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise common.InputError(f"{path}: not a readable CSV caption table ({type(e).__name__}: {e})") from None
  if {"video", "text"} <= fields:
    return [(r["video"], r["text"]) for r in rows]
  if {"videoid", "page_dir", "name"} <= fields:
    return [(f"{r['page_dir']}/{r['videoid']}.mp4", r["name"]) for r in rows]
  raise common.InputError(f"{path}: columns {sorted(fields)}; expected video,text or videoid,page_dir,name")


def read_table(path: str) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], int]:
  """(records, bad [(cause, key)], rows) of one caption table (module docstring)."""
  import av  # pylint: disable=g-import-not-at-top

  rows = _rows(path)
  base, name = epath.Path(path).parent, os.path.basename(path)
  records, bad, seen = [], [], set()
  for video, text in rows:
    key = f"{name}/{video}"
    if key in seen:
      bad.append(("duplicate_key", key))
      continue
    seen.add(key)
    if not (text or "").strip():
      bad.append(("empty_text", key))
      continue
    data, missing = common.read_media(common.resolve(video, base))
    if missing:
      bad.append(("missing_video", key))
      continue
    try:
      frames = sample_frames(data)
    except (av.error.FFmpegError, ValueError, IndexError) as e:  # no video stream: IndexError
      bad.append(("unsupported_codec", f"{key} ({type(e).__name__})"))
      continue
    if not frames:
      bad.append(("no_frames", key))
      continue
    encoded = [encode_jpeg(f) for f in frames]
    features = {
      "frames": encoded,
      "frame_paths": [f"{video}@{t:g}s" for t in range(len(encoded))],
      "frame_missing": [False] * len(encoded),
      "text": text.strip(),
    }
    records.append((key, features))
  return records, bad, len(rows)


class VideoTextMp4(beam.BeamBuilder, skip_registration=True):
  """Video-text pairs from video files and caption tables, frames at 1 FPS (module docstring)."""

  DESCRIPTION = "Video-text pairs from video files (PyAV, 1 frame per second) and CSV caption tables."
  CAUSES = CAUSES
  reader = read_table

  def _features(self):
    return {**common.image_list_features("frame"), "text": tfds.features.Text()}
