"""The MMC4 builder on Beam's DirectRunner: text_list + image_info to marker documents, bad lines counted
per cause, the bound naming the file, and the interleaved pipeline over its output."""

import json

import numpy as np
import pytest

from flamingo_jax.data import builders, pipeline, preprocess
from tests.data.data_helpers import image_bytes

pytest.importorskip("apache_beam", reason="the `data` extra (pip install -e .[data])")


def _doc(url, sentences, images):
  info = [
    {"image_name": n, "matched_text_index": i, "matched_sim": 0.3, "raw_url": "http://x"} for n, i in images
  ]
  return json.dumps({"url": url, "text_list": sentences, "image_info": info, "similarity_matrix": []})


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def test_documents_and_bad_lines_counted(tmp_path):
  for k in range(3):
    (tmp_path / f"i{k}.jpg").write_bytes(image_bytes("RGB", fmt="JPEG", seed=k))
  lines = [
    _doc("u0", ["First.", "Second.", "Third."], [("i0.jpg", 1), ("i1.jpg", 0), ("i2.jpg", 1)]),
    _doc("u1", ["Only one."], [("gone.jpg", 0)]),  # a missing file: stored, dropped by the pipeline
    _doc("u0", ["Again."], [("i0.jpg", 0)]),  # duplicate_key
    _doc("u2", ["No images."], []),  # no_image
    _doc("u3", ["  "], [("i0.jpg", 0)]),  # empty_text
    "{not json",  # bad_json
    json.dumps({"url": "u4", "text_list": "not a list", "image_info": []}),  # bad_json
  ]
  b = builders.prepare(
    builders.make_builder(
      "interleaved_mmc4",
      str(tmp_path / "tfds"),
      name="mmc4",
      sources=_write(tmp_path, "docs.jsonl", lines),
      max_bad_fraction=1.0,
    )
  )
  assert b.info.metadata["dropped"] == {"bad_json": 2, "no_image": 1, "empty_text": 1, "duplicate_key": 1}
  source = b.as_data_source("train")
  docs = {bytes(source[i]["text"]).decode(): source[i] for i in range(len(source))}
  first = docs["<image> First. <image> <image> Second. Third."]  # images before their sentence
  assert [bytes(p).decode() for p in first["image_paths"]] == ["i1.jpg", "i0.jpg", "i2.jpg"]
  assert bytes(first["images"][1]) == image_bytes("RGB", fmt="JPEG", seed=0)
  assert docs["<image> Only one."]["image_missing"][0]


def test_a_file_past_the_bound_stops_the_build_naming_it(tmp_path):
  path = _write(tmp_path, "shard-7.jsonl", ["{oops", _doc("u", ["x"], [])])
  with pytest.raises(
    Exception, match=r"shard-7\.jsonl: 2 bad of 2 records.*the first: shard-7\.jsonl/1 \(bad_json\)"
  ):
    builders.prepare(
      builders.make_builder("interleaved_mmc4", str(tmp_path / "tfds"), name="bad", sources=path)
    )


def test_the_interleaved_pipeline_reads_it(tmp_path, tokenizer):
  (tmp_path / "a.jpg").write_bytes(image_bytes("RGB", fmt="JPEG"))
  path = _write(
    tmp_path, "d.jsonl", [_doc(f"u{k}", ["A sentence.", "Another."], [("a.jpg", 1)]) for k in range(3)]
  )
  b = builders.prepare(
    builders.make_builder("interleaved_mmc4", str(tmp_path / "tfds"), name="pipe", sources=path)
  )
  spec = pipeline.DatasetSpec(
    name="pipe",
    kind="interleaved",
    batch_size=3,
    max_tokens=40,
    max_images=2,
    image=preprocess.ImageOptions(size=8),
  )
  batch = next(pipeline.DatasetPipeline(spec, b.as_data_source("train"), tokenizer, seed=0, training=True))
  assert batch["media_mask"].tolist() == [[True, False]] * 3 and np.isfinite(batch["images"]).all()
