"""The paper's data config (`configs/flamingo.py:data=paper`) end to end on small fixtures of each layout:
parquet documents, webdataset shards and mp4 clips, built on Beam by the real builders, then trained
for a few steps of the tiny model (its LM widened to a byte tokenizer)."""

import io
import json
import tarfile

import numpy as np
import pytest

from configs import flamingo as flamingo_config
from flamingo_jax.train import loop
from tests.data.data_helpers import byte_tokenizer_json, image_bytes

pytest.importorskip("apache_beam", reason="the `data` extra (pip install -e .[data])")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
av = pytest.importorskip("av")

SIZE = (80, 64)  # past the paper's 64 px filter


def _parquet(path, n):
  texts = [[f"Page {k}.", None, f"Photo {k} shows a thing.", None, "End."] for k in range(n)]
  images = [
    [None, image_bytes(size=SIZE, seed=k), None, image_bytes(size=SIZE, seed=99 - k), None] for k in range(n)
  ]
  pq.write_table(pa.table({"texts": texts, "images": pa.array(images, pa.list_(pa.binary()))}), path)
  return str(path)


def _shard(path, n):
  with tarfile.open(path, "w") as tar:
    for k in range(n):
      for name, data in (
        (f"{k:05d}.jpg", image_bytes(size=SIZE, fmt="JPEG", seed=k)),
        (f"{k:05d}.txt", f"pair {k}".encode()),
      ):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  return str(path)


def _clips(folder, n):
  folder.mkdir()
  for k in range(n):
    with av.open(str(folder / f"{k}.mp4"), "w") as out:
      stream = out.add_stream("mpeg4", rate=2)
      stream.width = stream.height = 32
      stream.pix_fmt = "yuv420p"
      for i in range(6):
        frame = np.full((32, 32, 3), 20 * i + k, np.uint8)
        out.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
      out.mux(stream.encode())
  table = folder / "captions.csv"
  table.write_text("video,text\n" + "".join(f"{k}.mp4,clip {k}\n" for k in range(n)))
  return str(table)


@pytest.mark.slow  # ~35 s (compiling the tiny model over four datasets): the default suite stays < 20 min
def test_the_paper_mixture_builds_on_beam_and_trains(tmp_path):
  sources = {
    "m3w": _parquet(tmp_path / "m3w.parquet", 8),
    "align": _shard(tmp_path / "align.tar", 8),
    "ltip": _shard(tmp_path / "ltip.tar", 8),
    "vtp": _clips(tmp_path / "vtp", 8),
  }
  config = flamingo_config.get_config("size=tiny,data=paper,steps=2")
  with config.unlocked():
    config.tokenizer = f"hf:{byte_tokenizer_json(tmp_path / 'tokenizer')}"
    config.model.lm.vocab_size = 257
    config.data.data_dir, config.data.prepare = str(tmp_path / "tfds"), True
    for name, ds in config.data.datasets.items():
      ds.builder_kwargs.sources.train = sources[name]
      ds.batch_size, ds.max_tokens = 8, 48
      ds.max_images, ds.num_frames = min(ds.max_images, 2), min(ds.num_frames, 2)
  metrics = loop.train(config, str(tmp_path / "run"))
  for name in sources:
    assert np.isfinite(metrics[f"loss/{name}"]), name
    assert metrics[f"data/{name}/dropped"] == 0, name
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    assert [json.loads(line)["step"] for line in f] == [1, 2]
