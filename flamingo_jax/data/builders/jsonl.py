"""TFDS builders for users' data: image-text pairs, interleaved documents, video-text, from JSONL.

Each builder takes `config=jsonl_config(name, {split: path_to_jsonl})` (see `common.py`), one JSON
object per line; paths are relative to the JSONL file's folder unless absolute. Unknown fields are
ignored. Building never decodes media (see `common.py`): bad image files are stored and dropped later.

Formats (one line each):

* `ImageTextJsonl`  (name `image_text_jsonl`): `{"image": "a.jpg", "text": "a caption"}`
* `VideoTextJsonl`  (name `video_text_jsonl`): `{"frames": ["f0.jpg", "f1.jpg", ...], "text": "..."}`
  (a clip is its frames as image files, in time order; the pipeline samples F of them).
* `InterleavedJsonl` (name `interleaved_jsonl`), either form:
  - MMC4-like: `{"texts": ["chunk 0", "chunk 1", ...], "images": ["a.jpg", ...],
    "image_positions": [1, ...]}`: image k is placed before text chunk `image_positions[k]`
    (`len(texts)` = after the last chunk); images at the same position keep their list order.
  - marker form: `{"text": "<image> A cat. <image> Its owner.", "images": ["a.jpg", "b.jpg"]}`.
  Both are stored in the marker form: one `text` with an `<image>` marker per image, and the images in
  marker order. In the MMC4 form, markers and chunks are joined by single spaces. A marker form whose
  marker count differs from its image count is stored as is, and dropped (and counted) by the pipeline.

Stored features: pairs `{image, image_path, image_missing, text}`; video `{frames, frame_paths,
frame_missing, text}`; interleaved `{text, images, image_paths, image_missing}` (see `common.py`).
"""

from collections.abc import Mapping
from typing import Any

import tensorflow_datasets as tfds

from flamingo_jax.data.builders import common

IMAGE_MARKER = "<image>"


def mmc4_to_marker_text(record: Mapping[str, Any], where: str) -> tuple[str, list[str]]:
  """(text with `<image>` markers, image paths in marker order) of an MMC4-like record."""
  texts = common.string_list(record, "texts", where)
  images = common.string_list(record, "images", where)
  positions = common.field(record, "image_positions", list, where)
  if len(positions) != len(images):
    raise common.InputError(f"{where}: {len(images)} images but {len(positions)} image_positions")
  for k, pos in enumerate(positions):
    if not isinstance(pos, int) or isinstance(pos, bool) or not 0 <= pos <= len(texts):
      raise common.InputError(
        f"{where}: image_positions[{k}] = {pos!r} is not a chunk index in [0, {len(texts)}]"
      )
  order = sorted(range(len(images)), key=lambda k: positions[k])  # stable: list order at ties
  pieces = []
  for c in range(len(texts) + 1):
    pieces += [IMAGE_MARKER for k in order if positions[k] == c]
    if c < len(texts) and texts[c].strip():
      pieces.append(texts[c].strip())
  return " ".join(pieces), [images[k] for k in order]


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Common part: one JSONL file per split, `_record` turns a line into features."""

  VERSION = tfds.core.Version(common.VERSION)
  DESCRIPTION = ""

  def _features(self) -> dict[str, tfds.features.FeatureConnector]:
    raise NotImplementedError

  def _record(self, record: Mapping[str, Any], base, where: str) -> dict[str, Any]:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self, description=self.DESCRIPTION, features=tfds.features.FeaturesDict(self._features())
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # local files only
    return {split: self._generate_examples(path) for split, path in common.split_sources(self).items()}

  def _generate_examples(self, path):
    for line_no, record in common.read_jsonl(path):
      yield line_no, self._record(record, path.parent, f"{path}:{line_no}")


class ImageTextJsonl(_JsonlBuilder):
  """Image-text pairs (ALIGN/LTIP-like) from `{"image": path, "text": caption}` lines."""

  DESCRIPTION = "Image-text pairs from a local JSONL file."

  def _features(self):
    return {**common.image_features(), "text": tfds.features.Text()}

  def _record(self, record, base, where):
    path = common.field(record, "image", str, where)
    data, missing = common.read_media(common.resolve(path, base))
    return {
      "image": data,
      "image_path": path,
      "image_missing": missing,
      "text": common.field(record, "text", str, where),
    }


class VideoTextJsonl(_JsonlBuilder):
  """Video-text pairs (VTP-like) from `{"frames": [paths], "text": caption}` lines."""

  DESCRIPTION = "Video-text pairs (clips as frame image files) from a local JSONL file."

  def _features(self):
    return {**common.image_list_features("frame"), "text": tfds.features.Text()}

  def _record(self, record, base, where):
    frames = common.string_list(record, "frames", where)
    return {**common.read_image_list(frames, base, "frame"), "text": common.field(record, "text", str, where)}


class InterleavedJsonl(_JsonlBuilder):
  """Interleaved image-text documents (M3W/MMC4-like); see the module docstring for the formats."""

  DESCRIPTION = "Interleaved image-text documents from a local JSONL file."

  def _features(self):
    return {"text": tfds.features.Text(), **common.image_list_features("image")}

  def _record(self, record, base, where):
    if "texts" in record:
      text, images = mmc4_to_marker_text(record, where)
    else:
      text = common.field(record, "text", str, where)
      images = common.string_list(record, "images", where)
    return {"text": text, **common.read_image_list(images, base, "image")}
