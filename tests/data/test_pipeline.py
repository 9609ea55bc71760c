"""One dataset's pipeline end to end (JSONL -> TFDS -> tf.data): static shapes, bad input counted."""

import logging

import numpy as np
import pytest

from flamingo_jax.data import builders, pipeline, preprocess, render
from flamingo_jax.data.sequence import Dropped
from tests.data.data_helpers import image_bytes, write_jsonl

OPTIONS = preprocess.ImageOptions(size=8)

BUILDER = {"pairs": "image_text_jsonl", "interleaved": "interleaved_jsonl", "video": "video_text_jsonl"}


def _pipeline(kind, records, media_dir, data_dir, tokenizer, name, *, training=False, image=None, **spec):
  path = write_jsonl(media_dir / f"{name}.jsonl", records)
  b = builders.prepare(builders.make_builder(BUILDER[kind], data_dir, name=name, sources=path))
  source = b.as_data_source("train")
  spec = pipeline.DatasetSpec(
    name=name,
    kind=kind,
    batch_size=spec.pop("batch_size", len(source)),
    max_tokens=spec.pop("max_tokens", 40),
    image=image or preprocess.ImageOptions(size=8),
    **spec,
  )
  return pipeline.DatasetPipeline(spec, source, tokenizer, seed=0, training=training)


def _check_batch(batch, B, N, F, T, S=8):
  shapes = {
    "images": (B, N, F, S, S, 3),
    "media_mask": (B, N),
    "tokens": (B, T),
    "targets": (B, T),
    "loss_mask": (B, T),
    "media_index": (B, T),
    "token_mask": (B, T),
  }
  dtypes = {
    "images": np.float32,
    "media_mask": bool,
    "tokens": np.int32,
    "targets": np.int32,
    "loss_mask": np.float32,
    "media_index": np.int32,
    "token_mask": bool,
  }
  assert {k: v.shape for k, v in batch.items()} == shapes
  assert {k: v.dtype for k, v in batch.items()} == {k: np.dtype(v) for k, v in dtypes.items()}
  kept = batch["token_mask"].any(1)
  # A dropped example is an empty row: no media, no tokens, no loss.
  assert not batch["media_mask"][~kept].any() and not batch["loss_mask"][~kept].any()
  assert not batch["images"][~kept].any() and (batch["media_index"][~kept] == -1).all()
  assert batch["media_mask"][kept, 0].all()
  return int(kept.sum())


def _dropped(metrics):
  return {k[len("dropped/") :]: v for k, v in metrics.items() if k.startswith("dropped/") and v}


def test_pairs_bad_input_counted(media_dir, data_dir, tokenizer):
  good = ["good.png", "gray.png", "rgba.png", "palette.png", "la.png", "cmyk.jpg", "gray16.png", "wide.jpg"]
  records = [{"image": n, "text": f"image {n}"} for n in good] + [
    {"image": "missing.png", "text": "m"},
    {"image": "empty.png", "text": "e"},
    {"image": "corrupt.png", "text": "c"},
    {"image": "truncated.png", "text": "t"},
    {"image": "good.png", "text": "  "},
    {"image": "good.png", "text": "x" * 100},
    {"image": "good.png", "text": "two <image> markers"},
  ]
  p = _pipeline("pairs", records, media_dir, data_dir, tokenizer, "bad_pairs", max_drop_ratio=1.0)
  batch = next(p)
  assert _check_batch(batch, 15, 1, 1, 40) == 8
  m = p.metrics()
  assert _dropped(m) == {
    "missing_image": 1,
    "empty_image": 1,
    "corrupt_image": 2,
    "empty_text": 1,
    "text_too_long": 1,
    "image_count_mismatch": 1,
  }
  assert m["examples"] == 15 and m["dropped"] == 7 and m["drop_ratio"] == pytest.approx(7 / 15)


def test_the_papers_image_filters_are_counted_drops(media_dir, data_dir, tokenizer):
  records = [
    {"image": "f0.png", "text": "kept"},  # 20x12
    {"image": "good.png", "text": "kept"},  # 20x12
    {"image": "wide.jpg", "text": "4:1"},  # 40x10
  ]
  filters = preprocess.ImageOptions(size=8, min_side=10, max_aspect=3.0)
  p = _pipeline(
    "pairs", records, media_dir, data_dir, tokenizer, "filtered", image=filters, max_drop_ratio=1.0
  )
  assert _check_batch(next(p), 3, 1, 1, 40) == 2
  assert _dropped(p.metrics()) == {"extreme_aspect": 1}
  strict = preprocess.ImageOptions(size=8, min_side=16)
  p = _pipeline(
    "pairs", records, media_dir, data_dir, tokenizer, "filtered", image=strict, max_drop_ratio=1.0
  )
  assert _check_batch(next(p), 3, 1, 1, 40) == 0
  assert _dropped(p.metrics()) == {"small_image": 3}


def test_interleaved_bad_input_counted(media_dir, data_dir, tokenizer):
  records = [
    {"text": "<image> a cat <image> a dog", "images": ["good.png", "gray.png"]},
    {"text": "text only", "images": []},
    {"text": "<image> one <image> two", "images": ["good.png"]},
    {
      "text": "<image> 1 <image> 2 <image> 3 <image> 4",
      "images": ["good.png", "gray.png", "rgba.png", "la.png"],
    },
    {"text": "x" * 60 + " <image> y", "images": ["good.png"]},
    {"text": "<image> " + "z" * 60, "images": ["good.png"]},
    {"text": "<image> c", "images": ["corrupt.png"]},
    {"text": "<image> m", "images": ["missing.png"]},
    {"text": "<image> a <image> b <image> c", "images": ["good.png", "gray.png", "corrupt.png"]},
    {"texts": ["A", "B"], "images": ["rgba.png", "cmyk.jpg"], "image_positions": [0, 1]},
    {"text": "<image>", "images": ["good.png"]},
    {"text": "<image> e", "images": ["empty.png"]},
  ]
  p = _pipeline(
    "interleaved", records, media_dir, data_dir, tokenizer, "bad_docs", max_images=2, max_drop_ratio=1.0
  )
  assert _check_batch(next(p), 12, 2, 1, 40) == 5
  m = p.metrics()
  assert _dropped(m) == {
    "no_image": 1,
    "image_count_mismatch": 1,
    "no_image_in_budget": 1,
    "corrupt_image": 1,
    "missing_image": 1,
    "empty_text": 1,
    "empty_image": 1,
  }
  assert m["truncated_images"] == 2 and m["truncated_tokens"] == 1


def test_video_bad_input_counted(media_dir, data_dir, tokenizer):
  frames = ["f0.png", "f1.png", "f2.png", "f3.png"]
  records = [
    {"frames": frames, "text": "a clip"},
    {"frames": frames[:2], "text": "short clip"},
    {"frames": [], "text": "no frames"},
    {"frames": ["f0.png", "corrupt.png"], "text": "bad frame"},
    {"frames": frames, "text": "w" * 50},
  ]
  p = _pipeline(
    "video", records, media_dir, data_dir, tokenizer, "bad_clips", num_frames=4, max_drop_ratio=1.0
  )
  assert _check_batch(next(p), 5, 1, 4, 40) == 2
  assert _dropped(p.metrics()) == {"no_image": 1, "corrupt_image": 1, "text_too_long": 1}


def test_drop_ratio_bound_stops_with_clear_error(media_dir, data_dir, tokenizer, caplog):
  records = [{"image": "corrupt.png" if i % 5 < 2 else "good.png", "text": f"n{i}"} for i in range(10)]
  p = _pipeline(
    "pairs",
    records,
    media_dir,
    data_dir,
    tokenizer,
    "mostly_bad",
    batch_size=5,
    max_drop_ratio=0.3,
    drop_check_after=5,
  )
  with (
    caplog.at_level(logging.WARNING, logger=pipeline.__name__),
    pytest.raises(pipeline.DataError, match=r"'mostly_bad'.*max_drop_ratio.*corrupt_image"),
  ):
    for _ in range(2):
      next(p)
  logged = [r.getMessage() for r in caplog.records if "corrupt_image" in r.getMessage()]
  assert len(logged) == 1 and "corrupt.png" in logged[0]  # logged once, with the file


def test_training_stream_is_deterministic_and_restartable(media_dir, data_dir, tokenizer):
  records = [{"image": "good.png", "text": f"caption {i}"} for i in range(6)]
  make = lambda: _pipeline(
    "pairs", records, media_dir, data_dir, tokenizer, "six", batch_size=4, training=True
  )
  a = make()
  batches = [next(a) for _ in range(5)]  # 20 examples: over three epochs of 6
  b = make()
  b.restart(3)
  for want in batches[3:]:
    got = next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # Each epoch is a permutation of the 6 records.
  texts = [tokenizer.decode(t[3:12]) for batch in batches for t in batch["tokens"]]
  for e in range(3):
    assert len(set(texts[6 * e : 6 * e + 6])) == 6


def test_spec_rejects_a_loss_from_that_is_not_a_template_field():
  with pytest.raises(ValueError, match="loss_from 'answer' is not a field of text_template"):
    pipeline.DatasetSpec(
      name="vqa", kind="pairs", batch_size=2, max_tokens=8, text_template="Q: {question}", loss_from="answer"
    )
  with pytest.raises(ValueError, match="loss_from is for pairs, not video"):
    pipeline.DatasetSpec(name="vtp", kind="video", batch_size=2, max_tokens=8, loss_from="text")


def _tf_rejects(data: bytes) -> bytes:
  """A JPEG whose header PIL reads but whose scan header libjpeg rejects (component id 77)."""
  sos = data.index(b"\xff\xda")
  return data[: sos + 5] + bytes([77]) + data[sos + 6 :]


def test_an_image_only_tensorflow_rejects_is_a_counted_drop_the_same_in_every_run(
  media_dir, data_dir, tokenizer, caplog
):
  bad = media_dir / "tf_rejects.jpg"
  bad.write_bytes(_tf_rejects(image_bytes("RGB", fmt="JPEG")))
  with pytest.raises(Dropped, match="corrupt_image.*tf_rejects.jpg"):  # evaluation and generation
    render.load_image(bad.read_bytes(), missing=False, path="tf_rejects.jpg", options=OPTIONS)
  records = [{"image": "tf_rejects.jpg" if i == 2 else "good.png", "text": f"n{i}"} for i in range(6)]
  runs = []
  for _ in range(2):
    p = _pipeline("pairs", records, media_dir, data_dir, tokenizer, "tf_rejects", batch_size=3, training=True)
    batches = [next(p) for _ in range(4)]
    assert sum(_check_batch(b, 3, 1, 1, 40) for b in batches) == 10  # 12 rows, record 2 twice
    assert _dropped(p.metrics()) == {"corrupt_image": 2}
    runs.append(batches)
  for a, b in zip(*runs):
    np.testing.assert_array_equal(a["images"], b["images"])
