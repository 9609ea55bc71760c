"""The mp4 + caption-table builder on Beam's DirectRunner: PyAV decoding at 1 frame per second, both
table layouts, bad rows counted per cause, and the video pipeline over its output."""

import io

import numpy as np
import pytest
from PIL import Image

from flamingo_jax.data import builders, pipeline, preprocess

pytest.importorskip("apache_beam", reason="the `data` extra (pip install -e .[data])")
av = pytest.importorskip("av")


def _mp4(path, seconds=3.5, fps=4, side=32):
  """A clip whose frames in second k are filled with grey level 40 * (k + 1)."""
  with av.open(str(path), "w") as out:
    stream = out.add_stream("mpeg4", rate=fps)
    stream.width = stream.height = side
    stream.pix_fmt = "yuv420p"
    for i in range(int(seconds * fps)):
      level = 40 * (i // fps + 1)
      frame = av.VideoFrame.from_ndarray(np.full((side, side, 3), level, np.uint8), format="rgb24")
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
  return path


def _build(data_dir, name, sources, **kwargs):
  return builders.prepare(
    builders.make_builder("video_text_mp4", str(data_dir), name=name, sources=sources, **kwargs)
  )


def test_frames_at_one_per_second_and_bad_rows_counted(tmp_path):
  (tmp_path / "v").mkdir()
  _mp4(tmp_path / "v" / "a.mp4")
  _mp4(tmp_path / "v" / "b.mp4", seconds=1.0)
  (tmp_path / "v" / "junk.mp4").write_bytes(b"not a video")
  (tmp_path / "captions.csv").write_text(
    "video,text\n"
    "v/a.mp4,a clip of greys\n"
    "v/b.mp4,a short one\n"
    "v/a.mp4,listed again\n"  # duplicate_key
    "v/missing.mp4,gone\n"  # missing_video
    "v/junk.mp4,junk\n"  # unsupported_codec
    'v/b.mp4,"  "\n'  # duplicate_key as well: a key is checked before its caption
  )
  b = _build(tmp_path / "tfds", "vids", str(tmp_path / "captions.csv"), max_bad_fraction=1.0)
  assert b.info.metadata["dropped"] == {
    "missing_video": 1,
    "unsupported_codec": 1,
    "no_frames": 0,
    "empty_text": 0,
    "duplicate_key": 2,
  }
  source = b.as_data_source("train")
  clips = {bytes(source[i]["text"]).decode(): source[i] for i in range(len(source))}
  assert sorted(clips) == ["a clip of greys", "a short one"]
  frames = [np.asarray(Image.open(io.BytesIO(bytes(f)))) for f in clips["a clip of greys"]["frames"]]
  assert len(frames) == 4  # t = 0, 1, 2, 3 s of a 3.5 s clip
  np.testing.assert_allclose([f.mean() for f in frames], [40, 80, 120, 160], atol=6)
  assert len(clips["a short one"]["frames"]) == 1


def test_webvid_columns_and_an_empty_caption(tmp_path):
  (tmp_path / "000").mkdir()
  _mp4(tmp_path / "000" / "17.mp4", seconds=2.0)
  _mp4(tmp_path / "000" / "18.mp4", seconds=2.0)
  (tmp_path / "results.csv").write_text(
    "videoid,contentUrl,duration,page_dir,name\n17,u,PT2S,000,waves\n18,u,PT2S,000, \n"
  )
  b = _build(tmp_path / "tfds", "webvid", str(tmp_path / "results.csv"), max_bad_fraction=1.0)
  assert b.info.splits["train"].num_examples == 1 and b.info.metadata["dropped"]["empty_text"] == 1
  (tmp_path / "bad.csv").write_text("file,caption\nx.mp4,y\n")
  with pytest.raises(Exception, match=r"bad\.csv: columns \['caption', 'file'\]"):
    _build(tmp_path / "tfds", "badcols", str(tmp_path / "bad.csv"))
  (tmp_path / "gone.csv").write_text("video,text\na.mp4,x\nb.mp4,y\n000/17.mp4,z\n")
  with pytest.raises(
    Exception, match=r"gone\.csv: 2 bad of 3 records.*the first: gone\.csv/a\.mp4 \(missing_video\)"
  ):
    _build(tmp_path / "tfds", "gone", str(tmp_path / "gone.csv"))


def test_the_video_pipeline_reads_it(tmp_path, tokenizer):
  _mp4(tmp_path / "c.mp4", seconds=3.0)
  (tmp_path / "t.csv").write_text("video,text\nc.mp4,grey levels\n")
  b = _build(tmp_path / "tfds", "pipe", str(tmp_path / "t.csv"))
  spec = pipeline.DatasetSpec(
    name="pipe",
    kind="video",
    batch_size=1,
    max_tokens=24,
    num_frames=2,
    image=preprocess.ImageOptions(size=8),
  )
  batch = next(pipeline.DatasetPipeline(spec, b.as_data_source("train"), tokenizer, seed=0, training=False))
  assert batch["images"].shape == (1, 1, 2, 8, 8, 3)
  np.testing.assert_allclose(batch["images"][0, 0, :, 4, 4, 0], [40 / 255, 120 / 255], atol=0.03)
