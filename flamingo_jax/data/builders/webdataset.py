"""Image-text pairs from img2dataset webdataset shards (LAION, COYO, DataComp, CC12M), prepared on Beam.

A shard is a tar file whose members are grouped by *key*, the member name up to its first dot after the
last '/': `00001.jpg`, `00001.txt`, `00001.json` are one record. A record needs one image member
(`IMAGE_EXTENSIONS`) and a `.txt` caption; other members (`.json`, ...) are ignored.

Prepared on Apache Beam, one shard per unit of work (`beam.py`; docs/DATA.md), into ArrayRecord. Images
are stored as their encoded bytes, never decoded here (`common.py`); the input pipeline decodes them and
counts the undecodable ones.

Bad records are dropped and counted per cause (`info.metadata['dropped']`):
  missing_image      a key with a caption but no image member
  missing_text       a key with an image but no `.txt` member
  empty_text         a caption that is blank
  unsupported_image  an image member whose extension is not an image format we read
  duplicate_key      a key seen twice in one shard (the first is kept)
  unreadable_member  a member the tar reader cannot extract
A shard whose bad records exceed `max_bad_fraction` of its records, or that is not a readable tar
file, stops the build with an `InputError` naming the shard (and its first bad key). Record keys are
'<shard file name>/<key>'. Config: `beam.beam_config(name, sources={split: tar paths or patterns})`.
"""

import os
import tarfile

import tensorflow_datasets as tfds
from etils import epath

from flamingo_jax.data.builders import beam, common

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Members img2dataset writes beside the image that are not images.
NON_IMAGE_EXTENSIONS = ("txt", "json", "cls", "npy", "parquet")
CAUSES = (
  "missing_image",
  "missing_text",
  "empty_text",
  "unsupported_image",
  "duplicate_key",
  "unreadable_member",
)


def split_key(member_name: str) -> tuple[str, str]:
  """('dir/00001', 'jpg') of 'dir/00001.jpg' (webdataset: the extension starts at the basename's first dot)."""
  folder, base = os.path.split(member_name)
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_shard(path: str) -> tuple[list[tuple[str, dict]], list[tuple[str, str]], int]:
  """(records [(key, features)], bad [(cause, key)], number of keys) of one shard.

  Raises InputError naming the shard when it is not a readable tar file."""
  members: dict[str, dict[str, bytes]] = {}
  bad: list[tuple[str, str]] = []
  order: list[str] = []
  try:
    with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        key, ext = split_key(member.name)
        if key not in members:
          members[key] = {}
          order.append(key)
        if ext in members[key]:
          bad.append(("duplicate_key", key))
          continue
        try:
          members[key][ext] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError) as e:
          bad.append(("unreadable_member", f"{member.name} ({type(e).__name__})"))
          members[key][ext] = None
  except (tarfile.TarError, OSError, EOFError) as e:
    raise common.InputError(
      f"webdataset shard {path}: not a readable tar file ({type(e).__name__}: {e})"
    ) from None
  records = []
  shard = os.path.basename(path)
  for key in order:
    parts = members[key]
    if any(v is None for v in parts.values()):
      continue  # counted as unreadable_member
    images = [e for e in parts if e in IMAGE_EXTENSIONS]
    others = [e for e in parts if e not in IMAGE_EXTENSIONS and e not in NON_IMAGE_EXTENSIONS]
    if not images:
      bad.append(("unsupported_image" if others else "missing_image", key))
      continue
    if "txt" not in parts:
      bad.append(("missing_text", key))
      continue
    text = parts["txt"].decode("utf-8", errors="replace").strip()
    if not text:
      bad.append(("empty_text", key))
      continue
    image = parts[images[0]]
    records.append(
      (
        f"{shard}/{key}",
        {"image": image, "image_path": f"{path}:{key}.{images[0]}", "image_missing": False, "text": text},
      )
    )
  return records, bad, len(order)


class ImageTextWebdataset(beam.BeamBuilder, skip_registration=True):
  """Image-text pairs from webdataset tar shards, prepared on Beam (module docstring)."""

  DESCRIPTION = "Image-text pairs from img2dataset webdataset shards."
  CAUSES = CAUSES
  reader = read_shard

  def _features(self):
    return {**common.image_features(), "text": tfds.features.Text()}
