"""The webdataset (img2dataset tar shards) builder, prepared on Beam's DirectRunner: records, bad
records counted per cause, the bad-fraction bound naming the shard, nothing half-written, the pipeline."""

import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from flamingo_jax.data import builders, pipeline, preprocess
from tests.data.data_helpers import image_bytes

pytest.importorskip("apache_beam", reason="the `data` extra (pip install -e .[data])")


def _write_shard(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


def _good(prefix, n):
  out = []
  for k in range(n):
    key = f"{prefix}{k:04d}"
    out += [
      (f"{key}.jpg", image_bytes("RGB", fmt="JPEG", seed=k)),
      (f"{key}.txt", f"a caption {key}".encode()),
    ]
    out.append((f"{key}.json", b'{"width": 20}'))
  return out


BAD = [  # one record of each cause the builder drops
  ("m0001.txt", b"caption without its image"),  # missing_image
  ("m0002.jpg", image_bytes("RGB", fmt="JPEG")),  # missing_text
  ("m0003.jpg", image_bytes("RGB", fmt="JPEG")),  # empty_text
  ("m0003.txt", b"   "),
  ("m0004.gif", b"GIF89a"),  # unsupported_image
  ("m0004.txt", b"a gif"),
  ("a0000.txt", b"a second caption for a0000"),  # duplicate_key (a0000 is in the good part)
]


def _build(data_dir, name, shards, **kwargs):
  return builders.prepare(
    builders.make_builder("image_text_webdataset", str(data_dir), name=name, sources=shards, **kwargs)
  )


def _examples(builder):
  source = builder.as_data_source("train")
  return sorted((bytes(source[i]["image_path"]), bytes(source[i]["text"])) for i in range(len(source)))


def test_records_and_each_bad_record_counted_under_its_cause(tmp_path):
  shards = [
    _write_shard(tmp_path / "00000.tar", _good("a", 30) + BAD),
    _write_shard(tmp_path / "00001.tar", _good("b", 20)),
  ]
  b = _build(tmp_path / "tfds", "wd", str(tmp_path / "*.tar"), max_bad_fraction=0.5)
  assert b.info.splits["train"].num_examples == 50 and b.info.metadata["records"] == 50
  assert b.info.metadata["dropped"] == {
    "missing_image": 1,
    "missing_text": 1,
    "empty_text": 1,
    "unsupported_image": 1,
    "duplicate_key": 1,
    "unreadable_member": 0,
  }
  texts = {text for _, text in _examples(b)}
  assert b"a caption a0000" in texts and b"a second caption for a0000" not in texts  # the first is kept
  assert all(
    path.startswith(shards[0].encode()) or path.startswith(shards[1].encode()) for path, _ in _examples(b)
  )
  # The counts survive a reload from disk.
  again = builders.make_builder("image_text_webdataset", str(tmp_path / "tfds"), name="wd", sources=shards)
  assert again.info.metadata["dropped"]["duplicate_key"] == 1


def test_a_shard_past_the_bad_fraction_or_not_a_tar_stops_the_build_naming_it(tmp_path):
  bad = _write_shard(tmp_path / "00007.tar", _good("a", 4) + BAD)  # 5 bad of 8 keys
  with pytest.raises(Exception, match=r"00007\.tar: 5 bad of 8 records.*the first: a0000 \(duplicate_key\)"):
    _build(tmp_path / "tfds", "too_bad", bad, max_bad_fraction=0.1)
  (tmp_path / "00008.tar").write_bytes(b"not a tar file at all")
  with pytest.raises(Exception, match=r"00008\.tar: not a readable tar file"):
    _build(tmp_path / "tfds", "not_tar", str(tmp_path / "00008.tar"))
  with pytest.raises(FileNotFoundError, match=r"no source file matches .*missing-\*\.tar"):
    _build(tmp_path / "tfds", "none", str(tmp_path / "missing-*.tar"))


def test_a_failed_build_leaves_nothing_and_the_rerun_equals_a_clean_build(tmp_path):
  good = _write_shard(tmp_path / "00000.tar", _good("a", 12))
  broken = tmp_path / "00001.tar"
  broken.write_bytes(b"truncated")
  data_dir = tmp_path / "tfds"
  with pytest.raises(Exception, match="not a readable tar"):
    _build(data_dir, "rerun", [good, str(broken)])
  final = data_dir / "image_text_webdataset" / "rerun" / "1.0.0"
  assert not final.exists()  # TFDS writes to an incomplete folder and renames only at the end
  _write_shard(broken, _good("b", 7))
  rerun = _build(data_dir, "rerun", [good, str(broken)])
  clean = _build(tmp_path / "clean", "rerun", [good, str(broken)])
  assert _examples(rerun) == _examples(clean) and len(_examples(rerun)) == 19


def test_the_pairs_pipeline_reads_it_and_counts_undecodable_images(tmp_path, tokenizer):
  members = _good("a", 6) + [("c0000.jpg", b"\xff\xd8 not really a jpeg"), ("c0000.txt", b"corrupt")]
  b = _build(tmp_path / "tfds", "pipe", _write_shard(tmp_path / "0.tar", members), max_bad_fraction=0.5)
  spec = pipeline.DatasetSpec(
    name="pipe",
    kind="pairs",
    batch_size=7,
    max_tokens=24,
    image=preprocess.ImageOptions(size=8),
    max_drop_ratio=1.0,
  )
  p = pipeline.DatasetPipeline(spec, b.as_data_source("train"), tokenizer, seed=0, training=True)
  batch = next(p)
  assert batch["images"].shape == (7, 1, 1, 8, 8, 3) and int(batch["token_mask"].any(1).sum()) == 6
  assert p.metrics()["dropped/corrupt_image"] == 1
  assert np.isfinite(batch["images"]).all() and os.path.basename(b.data_dir) == "1.0.0"


def test_the_prepare_entry_point_builds_a_configs_webdataset_sources(tmp_path):
  shard = _write_shard(tmp_path / "00000.tar", _good("a", 5))
  data_dir = tmp_path / "tfds"
  flags = [f"--config.data.data_dir={data_dir}"]
  for name in ("align", "ltip"):  # the paper's stage-1 pairs (webdataset shards), pointed at the fixture
    flags.append(f"--config.data.datasets.{name}.builder_kwargs.sources.train={shard}")
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cmd = [sys.executable, "-m", "flamingo_jax.data.prepare", "--config=configs/contrastive.py:size=f6", *flags]
  proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "prepared align" in proc.stdout and "prepared ltip" in proc.stdout
  for name in ("align", "ltip"):
    b = builders.make_builder("image_text_webdataset", str(data_dir), name=name, sources=shard)
    assert b.info.splits["train"].num_examples == 5
