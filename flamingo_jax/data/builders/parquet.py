"""Interleaved documents from OBELICS-style parquet files, prepared on Apache Beam.

A row is one web document: two aligned list columns, `texts` and `images`, where position i holds
either a text (`texts[i]` set, `images[i]` null) or an image (`images[i]` set, `texts[i]` null), in
reading order. An image entry is the image's encoded bytes (a binary column), or a path to its file
(a string column, as OBELICS ships URLs that img2dataset then downloads: point the strings at the
local or gs:// files, relative to the parquet file's folder unless absolute). The row is stored like
every interleaved document (`jsonl.py`): one text with an `<image>` marker per image, the images in
marker order, their bytes undecoded (`common.py`); pieces are joined by single spaces.

Prepared on Beam, one parquet file per unit of work (`beam.py`; docs/DATA.md). Bad rows are dropped and
counted per cause (`info.metadata['dropped']`):
  no_image         a document without any image
  empty_text       a document without any text
  misaligned_row   `texts` and `images` of different lengths, or a position holding both or neither
A file past `max_bad_fraction` bad rows, or that parquet cannot read, stops the build naming it.
Record keys are '<file name>/<row index>'. Config: `beam.beam_config(name, sources={split: files})`.
"""

import os

import tensorflow_datasets as tfds
from etils import epath

from flamingo_jax.data.builders import beam, common

IMAGE_MARKER = "<image>"
CAUSES = ("no_image", "empty_text", "misaligned_row")


def document(texts: list, images: list, base: epath.Path, where: str) -> tuple[str | None, dict | None]:
  """(cause, None) of a bad row, or (None, features) of a good one; `where` names the row in logs."""
  if texts is None or images is None or len(texts) != len(images):
    return "misaligned_row", None
  pieces, media = [], []  # media: (bytes, path, missing) per image
  for k, (text, image) in enumerate(zip(texts, images)):
    if (text is None) == (image is None):
      return "misaligned_row", None
    if text is not None:
      if text.strip():
        pieces.append(text.strip())
      continue
    pieces.append(IMAGE_MARKER)
    if isinstance(image, bytes):
      media.append((image, f"{where}:image {k}", False))
    else:
      data, missing = common.read_media(common.resolve(str(image), base))
      media.append((data, str(image), missing))
  if not media:
    return "no_image", None
  if not any(p != IMAGE_MARKER for p in pieces):
    return "empty_text", None
  data, paths, missing = (list(column) for column in zip(*media))
  return None, {"text": " ".join(pieces), "images": data, "image_paths": paths, "image_missing": missing}


def read_parquet(path: str) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], int]:
  """(records, bad [(cause, key)], rows) of one parquet file; InputError naming it when unreadable."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top  (the `data` extra)

  try:
    with epath.Path(path).open("rb") as f:
      table = pq.read_table(f, columns=["texts", "images"])
  except Exception as e:  # pylint: disable=broad-except  (pyarrow raises many kinds)
    raise common.InputError(
      f"{path}: not a readable parquet file with texts/images ({type(e).__name__}: {e})"
    ) from None
  base, name = epath.Path(path).parent, os.path.basename(path)
  records, bad = [], []
  texts, images = table.column("texts").to_pylist(), table.column("images").to_pylist()
  for row, (t, i) in enumerate(zip(texts, images)):
    key = f"{name}/{row}"
    cause, features = document(t, i, base, f"{path}:row {row}")
    if cause:
      bad.append((cause, key))
    else:
      records.append((key, features))
  return records, bad, len(texts)


class InterleavedParquet(beam.BeamBuilder, skip_registration=True):
  """Interleaved documents from OBELICS-style parquet files, prepared on Beam (module docstring)."""

  DESCRIPTION = "Interleaved image-text documents from OBELICS-style parquet files."
  CAUSES = CAUSES
  reader = read_parquet

  def _features(self):
    return {"text": tfds.features.Text(), **common.image_list_features("image")}
