"""The OBELICS-style parquet builder on Beam's DirectRunner: rows to marker documents (image bytes in the
file or paths to files), bad rows counted per cause, the bad-fraction bound, the interleaved pipeline."""

import numpy as np
import pytest

from flamingo_jax.data import builders, pipeline, preprocess
from tests.data.data_helpers import image_bytes

pytest.importorskip("apache_beam", reason="the `data` extra (pip install -e .[data])")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _write(path, rows, binary=True):
  kind = pa.binary() if binary else pa.string()
  table = pa.table(
    {
      "texts": pa.array([r[0] for r in rows], pa.list_(pa.string())),
      "images": pa.array([r[1] for r in rows], pa.list_(kind)),
      "general_metadata": pa.array(["{}"] * len(rows)),  # OBELICS' other columns are ignored
    }
  )
  pq.write_table(table, path)
  return str(path)


def _good(n, seed=0):
  return [
    (
      [f"Title {k}.", None, f"A picture of thing {k}.", None, "The end."],
      [None, image_bytes(seed=seed + k), None, image_bytes(seed=seed + 50 + k), None],
    )
    for k in range(n)
  ]


BAD = [
  (["only text"], [None]),  # no_image
  ([None, "  "], [image_bytes(), None]),  # empty_text
  (["a", None], [None]),  # misaligned_row: lengths differ
  (["both", None], [b"x", b"y"]),  # misaligned_row: a position holds text and image
]


def _build(data_dir, name, sources, **kwargs):
  return builders.prepare(
    builders.make_builder("interleaved_parquet", str(data_dir), name=name, sources=sources, **kwargs)
  )


def test_rows_become_marker_documents_and_bad_rows_are_counted(tmp_path):
  (tmp_path / "img").mkdir()
  (tmp_path / "img" / "a.png").write_bytes(image_bytes(seed=7))
  files = [
    _write(tmp_path / "part-0.parquet", _good(10) + BAD),
    _write(
      tmp_path / "part-1.parquet",
      [(["See:", None], [None, "img/a.png"]), (["Gone:", None], [None, "img/missing.png"])],
      binary=False,
    ),
  ]
  b = _build(tmp_path / "tfds", "obelics", str(tmp_path / "part-*.parquet"), max_bad_fraction=0.5)
  assert b.info.metadata["dropped"] == {"no_image": 1, "empty_text": 1, "misaligned_row": 2}
  assert b.info.splits["train"].num_examples == 12 and b.info.metadata["records"] == 12
  source = b.as_data_source("train")
  docs = {bytes(source[i]["text"]).decode(): source[i] for i in range(len(source))}
  first = docs["Title 0. <image> A picture of thing 0. <image> The end."]
  assert (
    bytes(first["images"][1]) == image_bytes(seed=50) and files[0] in bytes(first["image_paths"][0]).decode()
  )
  from_path = docs["See: <image>"]
  assert bytes(from_path["images"][0]) == image_bytes(seed=7) and not from_path["image_missing"][0]
  assert docs["Gone: <image>"]["image_missing"][0]  # stored, and dropped (counted) by the pipeline


def test_a_file_past_the_bound_or_unreadable_stops_the_build_naming_it(tmp_path):
  bad = _write(tmp_path / "bad.parquet", _good(2) + BAD)
  with pytest.raises(
    Exception, match=r"bad\.parquet: 4 bad of 6 records.*the first: bad\.parquet/2 \(no_image\)"
  ):
    _build(tmp_path / "tfds", "too_bad", bad)
  (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
  with pytest.raises(Exception, match=r"junk\.parquet: not a readable parquet file"):
    _build(tmp_path / "tfds", "junk", str(tmp_path / "junk.parquet"))


def test_the_interleaved_pipeline_trains_on_it(tmp_path, tokenizer):
  b = _build(tmp_path / "tfds", "pipe", _write(tmp_path / "p.parquet", _good(4)))
  spec = pipeline.DatasetSpec(
    name="pipe",
    kind="interleaved",
    batch_size=4,
    max_tokens=48,
    max_images=2,
    image=preprocess.ImageOptions(size=8),
  )
  p = pipeline.DatasetPipeline(spec, b.as_data_source("train"), tokenizer, seed=0, training=True)
  batch = next(p)
  assert batch["images"].shape == (4, 2, 1, 8, 8, 3) and batch["media_mask"][:, 0].all()
  assert np.isfinite(batch["images"]).all() and p.metrics()["dropped"] == 0
