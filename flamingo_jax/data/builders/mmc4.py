"""Interleaved documents in MMC4's own layout, prepared on Apache Beam.

A source is a JSONL file (MMC4 ships one per shard), one document per line with MMC4's fields:
  text_list    the document's sentences, in order;
  image_info   [{"image_name": "a.jpg", "matched_text_index": i, ...}]: each image is placed before
               sentence i (images of one sentence keep their list order), as OpenFlamingo reads MMC4.
Image files are looked up by `image_name` relative to the JSONL file's folder (unpack MMC4's image shard
beside its JSONL), or at the absolute path or gs:// URL the name gives. Documents are stored like every
interleaved document (`jsonl.py`), images undecoded.

Prepared on Beam, one JSONL file per unit of work (`beam.py`; docs/DATA.md). Bad lines are dropped and
counted per cause (`info.metadata['dropped']`):
  bad_json        a line that is not a JSON object with the fields above (of the right types)
  no_image        a document without images
  empty_text      a document without text
  duplicate_key   a document whose `url` was seen before in the same file (the first is kept)
Missing image files are stored as missing and dropped (counted) by the input pipeline. A file past
`max_bad_fraction` bad lines stops the build naming it. Record keys are '<file name>/<line number>'.
"""

import json
import os

import tensorflow_datasets as tfds
from etils import epath

from flamingo_jax.data.builders import beam, common, jsonl

CAUSES = ("bad_json", "no_image", "empty_text", "duplicate_key")


def mmc4_document(record: dict, where: str) -> tuple[str, list[str]]:
  """(marker text, image names in marker order) of one MMC4 line; InputError when malformed."""
  texts = common.string_list(record, "text_list", where)
  info = common.field(record, "image_info", list, where)
  names, positions = [], []
  for k, entry in enumerate(info):
    if not isinstance(entry, dict):
      raise common.InputError(f"{where}: image_info[{k}] must be an object")
    names.append(common.field(entry, "image_name", str, f"{where}: image_info[{k}]"))
    positions.append(common.field(entry, "matched_text_index", int, f"{where}: image_info[{k}]"))
  as_positions = {"texts": texts, "images": names, "image_positions": positions}
  return jsonl.mmc4_to_marker_text(as_positions, where)


def read_mmc4(path: str) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], int]:
  """(records, bad [(cause, key)], lines) of one MMC4 JSONL file (module docstring)."""
  base, name = epath.Path(path).parent, os.path.basename(path)
  records, bad, urls, lines = [], [], set(), 0
  with epath.Path(path).open("r") as f:
    for line_no, line in enumerate(f, start=1):
      if not line.strip():
        continue
      lines += 1
      key = f"{name}/{line_no}"
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise common.InputError("not an object")
        text, images = mmc4_document(record, f"{path}:{line_no}")
      except (json.JSONDecodeError, common.InputError):
        bad.append(("bad_json", key))
        continue
      url = record.get("url")
      if url is not None and url in urls:
        bad.append(("duplicate_key", key))
        continue
      urls.add(url)
      if not images:
        bad.append(("no_image", key))
        continue
      if not text.replace(jsonl.IMAGE_MARKER, "").strip():
        bad.append(("empty_text", key))
        continue
      records.append((key, {"text": text, **common.read_image_list(images, base, "image")}))
  return records, bad, lines


class InterleavedMmc4(beam.BeamBuilder, skip_registration=True):
  """MMC4 documents (text_list + image_info), prepared on Beam (module docstring)."""

  DESCRIPTION = "Interleaved image-text documents in MMC4's JSONL layout."
  CAUSES = CAUSES
  reader = read_mmc4

  def _features(self):
    return {"text": tfds.features.Text(), **common.image_list_features("image")}
