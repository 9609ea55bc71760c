"""TFDS builders: JSONL builders (formats, input errors) and easy_vqa (offline, small subsets)."""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import builders
from flamingo_jax.data.builders import easy_vqa as easy_vqa_lib
from flamingo_jax.data.builders import easy_vqa_facts as facts_lib
from flamingo_jax.data.builders import jsonl as jsonl_lib
from tests.data.data_helpers import write_jsonl


def _build(builder, data_dir, /, **kwargs):
  return builders.prepare(builders.make_builder(builder, data_dir, **kwargs))


def _by(source, key):
  return {r[key] if not isinstance(r[key], bytes) else r[key].decode(): r for r in source}


def test_image_text_jsonl_stores_bytes_and_flags_missing(media_dir, tmp_path):
  path = write_jsonl(
    media_dir / "pairs_ok.jsonl",
    [
      {"image": "good.png", "text": "good"},
      {"image": str(media_dir / "corrupt.png"), "text": "corrupt"},  # absolute path
      {"image": "missing.png", "text": "missing", "extra": 1},
    ],
  )  # unknown fields ignored
  b = _build("image_text_jsonl", str(tmp_path), name="ok", sources=path)
  rows = _by(b.as_data_source("train"), "text")
  assert rows["good"]["image"] == (media_dir / "good.png").read_bytes()
  assert rows["corrupt"]["image"] == (media_dir / "corrupt.png").read_bytes()
  assert rows["missing"]["image"] == b"" and rows["missing"]["image_missing"]
  assert not rows["good"]["image_missing"]


@pytest.mark.parametrize(
  "line, message",
  [
    ('{"image": "good.png", "text": ', "invalid JSON"),
    ('{"text": "no image"}', "missing field 'image'"),
    ('{"image": 3, "text": "x"}', "field 'image' must be str"),
    ("[1, 2]", "expected a JSON object"),
  ],
)
def test_jsonl_input_errors_name_file_and_line(media_dir, tmp_path, line, message):
  path = write_jsonl(tmp_path / "bad.jsonl", [{"image": "good.png", "text": "ok"}, "", line])
  b = builders.make_builder("image_text_jsonl", str(tmp_path / "tfds"), name="bad", sources={"train": path})
  with pytest.raises(builders.InputError, match=f"bad.jsonl:3: .*{message}"):
    builders.prepare(b)


def test_missing_jsonl_file_is_reported(tmp_path):
  b = builders.make_builder(
    "video_text_jsonl", str(tmp_path), name="nope", sources={"train": str(tmp_path / "nope.jsonl")}
  )
  with pytest.raises(FileNotFoundError, match="nope.jsonl"):
    builders.prepare(b)


def test_mmc4_form_becomes_marker_text():
  record = {"texts": ["First.", "Second.", " "], "images": ["a", "b", "c"], "image_positions": [1, 0, 3]}
  text, images = jsonl_lib.mmc4_to_marker_text(record, "f:1")
  assert text == "<image> First. <image> Second. <image>"
  assert images == ["b", "a", "c"]
  with pytest.raises(builders.InputError, match=r"f:2: image_positions\[0\] = 5"):
    jsonl_lib.mmc4_to_marker_text({**record, "image_positions": [5, 0, 0]}, "f:2")
  with pytest.raises(builders.InputError, match="3 images but 2 image_positions"):
    jsonl_lib.mmc4_to_marker_text({**record, "image_positions": [0, 0]}, "f:3")


def test_interleaved_and_video_jsonl(media_dir, tmp_path):
  docs = write_jsonl(
    media_dir / "docs_ok.jsonl",
    [
      {"texts": ["A cat.", "A dog."], "images": ["good.png", "gray.png"], "image_positions": [0, 1]},
      {"text": "<image> one <image> two", "images": ["good.png"]},
    ],
  )  # mismatch kept for the pipeline
  b = _build("interleaved_jsonl", str(tmp_path), name="docs", sources=docs)
  rows = _by(b.as_data_source("train"), "text")
  assert set(rows) == {"<image> A cat. <image> A dog.", "<image> one <image> two"}
  assert [p.decode() for p in rows["<image> A cat. <image> A dog."]["image_paths"]] == [
    "good.png",
    "gray.png",
  ]
  clips = write_jsonl(
    media_dir / "clips_ok.jsonl", [{"frames": ["f0.png", "f1.png", "missing.png"], "text": "a clip"}]
  )
  b = _build("video_text_jsonl", str(tmp_path), name="clips", sources=clips)
  (row,) = list(b.as_data_source("train"))
  assert [bool(m) for m in row["frame_missing"]] == [False, False, True]
  assert row["frames"][1] == (media_dir / "f1.png").read_bytes()


def test_easy_vqa_package_found_without_fixed_path():
  root = easy_vqa_lib.package_root()
  assert (root / "train" / "questions.json").is_file()
  assert len(easy_vqa_lib.image_ids("test")) == 1000


def test_facts_from_questions():
  qs = [("what is the blue shape?", "rectangle"), ("is there not a red shape?", "yes")]
  assert facts_lib.facts_from_questions(qs) == ("blue", "rectangle")
  qs = [("is no triangle present?", "no"), ("is there a green shape?", "no")]
  assert facts_lib.facts_from_questions(qs) == (None, "triangle")
  assert facts_lib.Facts("red", "circle", "small").caption == "a small red circle"
  assert facts_lib.Facts("red", "circle", "").caption == "a red circle"


def test_pixel_facts_agree_with_questions():
  questions = easy_vqa_lib.read_questions("train")
  by_image = {}
  for q, a, i in questions:
    by_image.setdefault(i, []).append((q, a))
  for i in range(60):
    with Image.open(io.BytesIO(easy_vqa_lib._image_bytes("train", i))) as im:
      pixels = np.asarray(im.convert("RGB"))
    color, shape = facts_lib.facts_from_questions(by_image[i])
    if color:
      assert facts_lib.color_from_pixels(pixels) == color, i
    if shape:
      assert facts_lib.shape_from_pixels(pixels) == shape, i


@pytest.fixture(scope="module")
def easy(data_dir):
  return {kind: _build("easy_vqa", data_dir, kind=kind, max_examples=12) for kind in easy_vqa_lib.KINDS}


def test_easy_vqa_builds_small_subsets_offline(easy, data_dir):
  for kind, b in easy.items():
    assert b.builder_config.name == f"{kind}_max12"
    assert os.path.isdir(os.path.join(data_dir, "easy_vqa", f"{kind}_max12"))
    for split in ("train", "test"):
      assert len(b.as_data_source(split)) == 12, (kind, split)


def test_easy_vqa_captions_and_vqa(easy):
  captions = list(easy["captions"].as_data_source("train"))
  for r in captions:
    text = r["text"].decode()
    assert text.startswith("a ") and text.endswith(r["shape"].decode())
    assert r["color"].decode() in text
    assert r["image"] == easy_vqa_lib._image_bytes("train", int(r["image_id"]))
  vqa = list(easy["vqa"].as_data_source("test"))
  assert {r["question"].decode() for r in vqa} == {q for q, _, _ in easy_vqa_lib.read_questions("test")[:12]}


def test_easy_vqa_interleaved_documents(easy):
  parts = []
  for r in easy["interleaved"].as_data_source("train"):
    text = r["text"].decode()
    assert 2 <= len(r["images"]) <= 5
    assert text.count("<image>") == len(r["images"]) == len(r["image_ids"])
    parts += [p.strip() for p in text.split("<image>")[1:]]
  # Each image has a description or one of its questions in the VQA prompt's format.
  questions = {(q, a) for q, a, _ in easy_vqa_lib.read_questions("train")}
  for part in parts:
    if part.startswith("This is a "):
      continue
    q, a = re.fullmatch(r"Question: (.+\?) Answer: (\S+)", part).groups()
    assert (q, a) in questions
  assert sum(p.startswith("Question: ") for p in parts) > len(parts) // 2
  # Deterministic: the same documents from the facts module.
  ids = easy_vqa_lib.image_ids("train")
  assert facts_lib.document_groups(ids, "train") == facts_lib.document_groups(ids, "train")


def test_easy_vqa_bursty_documents(easy, data_dir, tmp_path):
  from flamingo_jax.data import binding  # pylint: disable=g-import-not-at-top

  train_names = set(binding.read_word_list(binding.default_word_list("train")))
  for r in easy["bursty"].as_data_source("train"):
    segments = [s.decode() for s in r["segments"]]
    assert "".join(segments) == r["text"].decode()
    assert r["text"].decode().count("<image>") == len(r["images"]) == len(r["image_ids"])
    names = [s.strip() for s in segments if s.startswith(" ")]
    assert set(names) <= train_names and 2 <= len(set(names)) <= 5
    flagged = [s.strip() for s, f in zip(segments, r["segment_loss"]) if f]
    assert flagged == [n for i, n in enumerate(names) if n in names[:i]]
  # Another word list is another dataset (its own config name); names come from it.
  words = tmp_path / "words.txt"
  words.write_text("dax\nwug\nfep\nzup\ntoma\n")
  b = _build("easy_vqa", data_dir, kind="bursty", max_examples=3, names_file=str(words))
  assert b.builder_config.name.startswith("bursty_w") and b.builder_config.name.endswith("_max3")
  for r in b.as_data_source("train"):
    assert {s.decode().strip() for s in r["segments"] if s.startswith(b" ")} <= {
      "dax",
      "wug",
      "fep",
      "zup",
      "toma",
    }
  with pytest.raises(ValueError, match="names_file is for kind bursty"):
    builders.make_builder("easy_vqa", data_dir, kind="captions", names_file=str(words))


def test_easy_vqa_video_clips_move(easy):
  for r in list(easy["video"].as_data_source("train"))[:3]:
    frames = [np.asarray(Image.open(io.BytesIO(f))) for f in r["frames"]]
    assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
    assert not np.array_equal(frames[0], frames[-1])
    motion = r["motion"].decode()
    assert r["text"].decode().startswith(f"the camera {motion} a ")
    assert motion == facts_lib.motion_of(int(r["image_id"]))


def test_easy_vqa_rejects_unknown_kind(data_dir):
  with pytest.raises(ValueError, match="unknown kind"):
    builders.make_builder("easy_vqa", data_dir, kind="audio")
  with pytest.raises(KeyError, match="unknown builder"):
    builders.make_builder("coco", data_dir)


def test_full_configs_are_the_predefined_ones(data_dir):
  b = builders.make_builder("easy_vqa", data_dir, kind="video")  # constructing builds nothing
  assert b.builder_config is easy_vqa_lib.EasyVqa.builder_configs["video"]
  assert b.builder_config.num_frames == 8 and b.builder_config.max_examples is None


@pytest.fixture
def damaged_source(tmp_path, monkeypatch):
  """A copy of the easy-vqa package data (images linked) in which 3 of the first 12 train images are
  bad: an empty file, half a PNG, and text. Returns {image id: file path} of the bad ones."""
  source = easy_vqa_lib.package_root()
  root = tmp_path / "easy_vqa_data"
  for split in easy_vqa_lib.SPLITS:
    (root / split / "images").mkdir(parents=True)
    (root / split / "questions.json").write_text((source / split / "questions.json").read_text())
    for i in easy_vqa_lib.image_ids(split):
      (root / split / "images" / f"{i}.png").symlink_to(source / split / "images" / f"{i}.png")
  ids = easy_vqa_lib.image_ids("train")[:12]
  good_png = easy_vqa_lib._image_bytes("train", ids[0])
  bad = {ids[1]: b"", ids[4]: good_png[: len(good_png) // 2], ids[7]: b"this is not an image\n"}
  for i, content in bad.items():
    path = root / "train" / "images" / f"{i}.png"
    path.unlink()
    path.write_bytes(content)
  monkeypatch.setattr(easy_vqa_lib, "package_root", lambda: root)
  return {i: str(root / "train" / "images" / f"{i}.png") for i in bad}


def test_easy_vqa_drops_and_names_bad_source_images(damaged_source, tmp_path, caplog):
  ids = easy_vqa_lib.image_ids("train")[:12]
  with caplog.at_level("WARNING"):
    b = _build("easy_vqa", str(tmp_path / "tfds"), kind="captions", max_examples=12, max_bad_fraction=0.5)
  kept = sorted(int(r["image_id"]) for r in b.as_data_source("train"))
  assert kept == [i for i in ids if i not in damaged_source]
  log = caplog.text
  for path in damaged_source.values():
    assert path in log
  assert re.search(r"empty_image", log) and re.search(r"corrupt_image", log)
  assert "easy_vqa/train: dropped 3 of 12 source files" in log
  vqa = _build("easy_vqa", str(tmp_path / "tfds"), kind="vqa", max_examples=40, max_bad_fraction=0.5)
  asked = [int(r["image_id"]) for r in vqa.as_data_source("train")]
  expected = [i for _, _, i in easy_vqa_lib.read_questions("train")[:40] if i not in damaged_source]
  assert sorted(asked) == sorted(expected) and len(expected) < 40  # a bad image's questions go too


def test_easy_vqa_too_many_bad_images_stop_the_build_naming_them(damaged_source, tmp_path):
  with pytest.raises(builders.InputError, match=r"3 of 12 source files do not decode") as e:
    _build("easy_vqa", str(tmp_path / "tfds"), kind="captions", max_examples=12)
  for path in damaged_source.values():
    assert path in str(e.value)
