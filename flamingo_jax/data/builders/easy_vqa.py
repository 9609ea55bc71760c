"""TFDS builder `easy_vqa`: the embedded default data, built offline from the installed package.

The PyPI package `easy-vqa` ships `data/{train,test}/images/<id>.png` (64x64 RGB) and
`data/{train,test}/questions.json` (`[question, answer, image_id]` triples); it is found with
`importlib.resources`, never a fixed path. Facts, captions, documents and clips are derived
deterministically (`easy_vqa_facts.py`). Configs (splits `train` and `test` each):

* `captions`: image-text pairs `{image, image_path, image_missing, text, image_id, color, shape,
  size}`, text like "a small blue rectangle"; one per image.
* `vqa`: `{image, image_path, image_missing, question, answer, image_id}`; one per question.
* `interleaved`: documents of 2-5 images `{text, images, image_paths, image_missing, image_ids}`, text
  like "<image> This is a red circle. <image>Question: is there a triangle? Answer: no" (the
  `interleaved_jsonl` form; questions in the few-shot VQA prompt's own format, see `easy_vqa_facts`).
* `bursty`: in-context binding documents (`flamingo_jax/data/binding.py`) of 4-12 images of 2-5
  (shape, colour) classes named from a word list (`names_file`, '' = the packaged training list):
  `{text, segments, segment_loss, images, image_paths, image_missing, image_ids}`; the loss falls
  on the segments flagged in `segment_loss` (a class's name after its first occurrence).
  BURSTY_DOCUMENTS documents per split.
* `video`: 8-frame clips of a virtual camera move over one image (`easy_vqa_facts.clip_frames`)
  `{frames, frame_paths, frame_missing, text, image_id, motion}`, text like
  "the camera zooms in on a small red circle"; one per image.

Source images that do not decode (truncated, empty, not an image) are logged by path and dropped
with their questions; more than `max_bad_fraction` of them stops the build with an error naming the
first few (`common.check_bad_files`).

`easy_vqa_config(kind, max_examples=n)` builds only the first n examples of each split (images in id
order, questions in file order, documents in their fixed order) under its own config name, for tests.
"""

import dataclasses
import importlib.resources
import io
import json
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from flamingo_jax.data import binding, preprocess
from flamingo_jax.data.builders import common
from flamingo_jax.data.builders import easy_vqa_facts as facts_lib
from flamingo_jax.data.sequence import Dropped

KINDS = ("captions", "vqa", "interleaved", "video", "bursty")
BURSTY_DOCUMENTS = {"train": 2000, "test": 200}
BURSTY_MAX_IMAGES = 12
SPLITS = ("train", "test")
PACKAGE = "easy_vqa"
MAX_BAD_FRACTION = 0.01
IMAGE_SIZE = 64  # the package's images: 64x64 RGB PNGs


@dataclasses.dataclass(eq=False)
class EasyVqaConfig(tfds.core.BuilderConfig):
  """kind: one of KINDS; max_examples: per split (None = all); num_frames: video clip length;
  names_file: the word list of `bursty` documents ('' = the packaged training list);
  max_bad_fraction: the fraction of source images that may fail to decode (dropped) before the
  build stops."""

  kind: str = "captions"
  max_examples: int | None = None
  num_frames: int = 8
  names_file: str = ""
  max_bad_fraction: float = MAX_BAD_FRACTION


def easy_vqa_config(
  kind: str,
  max_examples: int | None = None,
  num_frames: int = 8,
  names_file: str = "",
  max_bad_fraction: float = MAX_BAD_FRACTION,
) -> EasyVqaConfig:
  """The config of `kind`, named e.g. `captions`, `captions_max64`, `video_f4_max8`,
  `bursty_w1a2b3c4d` (a word list other than the packaged one, by the CRC32 of its words)."""
  if kind not in KINDS:
    raise ValueError(f"easy_vqa: unknown kind {kind!r}; expected one of {KINDS}")
  if names_file and kind != "bursty":
    raise ValueError(f"easy_vqa: names_file is for kind bursty, not {kind!r}")
  name = kind
  if kind == "video" and num_frames != 8:
    name += f"_f{num_frames}"
  if names_file:
    words = binding.read_word_list(names_file)
    name += f"_w{zlib.crc32(chr(10).join(words).encode()):08x}"
  if max_examples is not None:
    if max_examples < 1:
      raise ValueError(f"easy_vqa: max_examples must be >= 1, got {max_examples}")
    name += f"_max{max_examples}"
  if not 0 <= max_bad_fraction <= 1:
    raise ValueError(f"easy_vqa: max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
  if max_bad_fraction != MAX_BAD_FRACTION:
    name += "_bad" + f"{max_bad_fraction:g}".replace(".", "p")
  predefined = _PREDEFINED.get(name)
  if predefined is not None:  # TFDS refuses a new config object named like a class-level one
    return predefined
  return EasyVqaConfig(
    name=name,
    kind=kind,
    max_examples=max_examples,
    num_frames=num_frames,
    names_file=names_file,
    max_bad_fraction=max_bad_fraction,
    description=f"easy-VQA {kind}",
  )


_PREDEFINED: dict = {}


def package_root():
  """The installed package's data folder (an importlib.resources Traversable)."""
  return importlib.resources.files(PACKAGE) / "data"


def read_questions(split: str) -> list[tuple[str, str, int]]:
  raw = json.loads((package_root() / split / "questions.json").read_text())
  return [(str(q), str(a), int(i)) for q, a, i in raw]


def image_ids(split: str) -> list[int]:
  folder = package_root() / split / "images"
  return sorted(int(p.name[:-4]) for p in folder.iterdir() if p.name.endswith(".png"))


def _image_path(split: str, image_id: int) -> str:
  return f"{PACKAGE}/data/{split}/images/{image_id}.png"


def _image_file(split: str, image_id: int):
  return package_root() / split / "images" / f"{image_id}.png"


def _image_bytes(split: str, image_id: int) -> bytes:
  return _image_file(split, image_id).read_bytes()


def _read_images(split: str, ids, max_bad_fraction: float):
  """({id: encoded bytes}, {id: RGB image}) of the images of `ids` that decode; the others are
  logged by their file's path and dropped (an error past `max_bad_fraction`)."""
  data, images, bad = {}, {}, []
  for i in ids:
    path = _image_file(split, i)
    try:
      raw = path.read_bytes()
      images[i] = preprocess.decode(raw, missing=False, path=str(path), size=IMAGE_SIZE)
      data[i] = raw
    except OSError as e:
      bad.append(f"{path} ({type(e).__name__}: {e})")
    except Dropped as e:
      detail = e.detail.removeprefix(str(path)).lstrip(": ")
      bad.append(f"{path} ({e.reason}" + (f": {detail})" if detail else ")"))
  common.check_bad_files(bad, len(ids), max_bad_fraction, f"easy_vqa/{split}")
  return data, images


def _png(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="PNG")
  return buf.getvalue()


class EasyVqa(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """easy-VQA as captions, VQA, interleaved documents or video clips (see the module docstring)."""

  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "interleaved: 3 in 4 images carry a question, in the VQA prompt format.",
    "1.2.0": "bursty: in-context binding documents.",
    "1.3.0": "Undecodable source images are dropped; bursty documents pick images by a keyed "
    "hash, so a dropped image changes only the documents that showed it.",
  }
  BUILDER_CONFIGS = [easy_vqa_config(k) for k in KINDS]
  _PREDEFINED.update({c.name: c for c in BUILDER_CONFIGS})

  def _info(self) -> tfds.core.DatasetInfo:
    kind = self.builder_config.kind
    text = tfds.features.Text()
    ident = tfds.features.Tensor(shape=(), dtype=np.int64)
    features = {
      "captions": {
        **common.image_features(),
        "text": text,
        "image_id": ident,
        "color": text,
        "shape": text,
        "size": text,
      },
      "vqa": {**common.image_features(), "question": text, "answer": text, "image_id": ident},
      "interleaved": {
        "text": text,
        **common.image_list_features("image"),
        "image_ids": tfds.features.Sequence(ident),
      },
      "video": {**common.image_list_features("frame"), "text": text, "image_id": ident, "motion": text},
      "bursty": {
        "text": text,
        "segments": tfds.features.Sequence(text),
        "segment_loss": tfds.features.Sequence(common.FLAG),
        **common.image_list_features("image"),
        "image_ids": tfds.features.Sequence(ident),
      },
    }[kind]
    return tfds.core.DatasetInfo(
      builder=self,
      description=f"easy-VQA ({kind}), derived from the PyPI package easy-vqa.",
      features=tfds.features.FeaturesDict(features),
      homepage="https://github.com/vzhou842/easy-VQA",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data ship with the installed package
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    """The examples of `split` for the config's kind.

    Long: one short branch per kind over the shared decoded images.
    """
    config = self.builder_config
    limit = config.max_examples
    questions = read_questions(split)
    if config.kind == "vqa":
      asked = questions[:limit]
      data, _ = _read_images(split, sorted({i for _, _, i in asked}), config.max_bad_fraction)
      for n, (q, a, i) in enumerate(asked):
        if i in data:
          yield (
            n,
            {
              "image": data[i],
              "image_path": _image_path(split, i),
              "image_missing": False,
              "question": q,
              "answer": a,
              "image_id": i,
            },
          )
      return
    by_image: dict[int, list[tuple[str, str]]] = {}
    for q, a, i in questions:
      by_image.setdefault(i, []).append((q, a))
    ids = image_ids(split)
    groups = facts_lib.document_groups(ids, split)[:limit] if config.kind == "interleaved" else None
    wanted = (
      sorted({i for g in groups for i in g})
      if groups is not None
      else ids
      if config.kind == "bursty"
      else ids[:limit]
    )
    data, images = _read_images(split, wanted, config.max_bad_fraction)
    wanted = [i for i in wanted if i in data]
    facts = {i: facts_lib.image_facts(np.asarray(images[i]), by_image.get(i, ())) for i in wanted}

    if config.kind == "captions":
      for i in wanted:
        f = facts[i]
        yield (
          i,
          {
            "image": data[i],
            "image_path": _image_path(split, i),
            "image_missing": False,
            "text": f.caption,
            "image_id": i,
            "color": f.color,
            "shape": f.shape,
            "size": f.size,
          },
        )
    elif config.kind == "interleaved":
      for n, group in enumerate(groups):
        group = [i for i in group if i in data]  # a document loses only its undecodable images
        if not group:
          continue
        yield (
          n,
          {
            "text": facts_lib.document_text(group, facts, split),
            "images": [data[i] for i in group],
            "image_paths": [_image_path(split, i) for i in group],
            "image_missing": [False] * len(group),
            "image_ids": list(group),
          },
        )
    elif config.kind == "bursty":
      yield from _bursty_documents(split, config, data, facts)
    elif config.kind == "video":
      for i in wanted:
        motion = facts_lib.motion_of(i)
        frames = facts_lib.clip_frames(images[i], motion, config.num_frames)
        yield (
          i,
          {
            "frames": [_png(f) for f in frames],
            "frame_paths": [f"{_image_path(split, i)}#frame{t}" for t in range(len(frames))],
            "frame_missing": [False] * len(frames),
            "text": f"the camera {motion} {facts[i].caption}",
            "image_id": i,
            "motion": motion,
          },
        )
    else:
      raise ValueError(f"easy_vqa: unknown kind {config.kind!r}; expected one of {KINDS}")


def _bursty_documents(split, config, data, facts):
  """The `bursty` kind's examples: documents keyed by (split, index), deterministic."""
  names = binding.read_word_list(binding.resolve_word_list(config.names_file, "train"))
  pool = binding.class_pool([(str(i), f.color, f.shape) for i, f in sorted(facts.items())], "shape_color")
  count = (
    BURSTY_DOCUMENTS[split]
    if config.max_examples is None
    else min(config.max_examples, BURSTY_DOCUMENTS[split])
  )
  for n in range(count):
    segments, refs = binding.bursty_document(pool, names, key=(split, n), max_images=BURSTY_MAX_IMAGES)
    group = [int(r) for r in refs]
    yield (
      n,
      {
        "text": binding.document_text(segments),
        "segments": [s.text for s in segments],
        "segment_loss": [s.loss for s in segments],
        "images": [data[i] for i in group],
        "image_paths": [_image_path(split, i) for i in group],
        "image_missing": [False] * len(group),
        "image_ids": group,
      },
    )
