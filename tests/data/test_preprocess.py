"""Images: modes -> RGB, aspect-preserving resize + pad, augmentation only in training, bad bytes."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from flamingo_jax.data import preprocess, render
from flamingo_jax.data.sequence import Dropped

OPTIONS = preprocess.ImageOptions(size=16, pad_value=(0.25, 0.5, 0.75))


def _load(data, augment=None, options=OPTIONS):
  return render.load_image(data, missing=False, path="x.png", options=options, augment=augment)


@pytest.mark.parametrize(
  "name", ["good.png", "gray.png", "rgba.png", "palette.png", "la.png", "cmyk.jpg", "gray16.png"]
)
def test_every_mode_becomes_rgb_in_unit_range(media_dir, name):
  x = _load((media_dir / name).read_bytes())
  assert x.shape == (16, 16, 3) and x.dtype == np.float32
  assert x.min() >= 0.0 and x.max() <= 1.0
  # 20x12 image -> 16x10 content centred, rows 0..2 and 13..15 are padding.
  np.testing.assert_allclose(x[:3], np.broadcast_to([0.25, 0.5, 0.75], (3, 16, 3)))
  np.testing.assert_allclose(x[13:], np.broadcast_to([0.25, 0.5, 0.75], (3, 16, 3)))
  if name in ("gray.png", "gray16.png", "la.png"):
    np.testing.assert_allclose(x[3:13, ..., 0], x[3:13, ..., 1], atol=1e-6)


def test_aspect_ratio_kept_for_wide_images(media_dir):
  x = _load((media_dir / "wide.jpg").read_bytes())  # 40x10 -> 16x4, rows 6..9
  pad = np.array([0.25, 0.5, 0.75], np.float32)
  rows_padded = [bool(np.allclose(x[r], pad)) for r in range(16)]
  assert rows_padded == [True] * 6 + [False] * 4 + [True] * 6


def test_alpha_is_composited_on_white():
  rgba = np.zeros([4, 4, 4], np.uint8)  # fully transparent black
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  x = _load(buf.getvalue(), options=preprocess.ImageOptions(size=4))
  np.testing.assert_allclose(x, 1.0)


@pytest.mark.parametrize(
  "name, missing, reason",
  [
    ("missing.png", True, "missing_image"),
    ("empty.png", False, "empty_image"),
    ("corrupt.png", False, "corrupt_image"),
    ("truncated.png", False, "corrupt_image"),
  ],
)
def test_bad_files_raise_dropped_with_reason_and_path(media_dir, name, missing, reason):
  path = media_dir / name
  data = b"" if missing else path.read_bytes()
  with pytest.raises(Dropped) as e:
    render.load_image(data, missing=missing, path=name, options=OPTIONS)
  assert e.value.reason == reason and name in e.value.detail


@pytest.mark.parametrize(
  "size, reason",
  [((70, 64), None), ((64, 63), "small_image"), ((192, 64), None), ((193, 64), "extreme_aspect")],
)
def test_the_papers_image_filters_drop_small_and_elongated_images(size, reason):
  image = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(image, "RGB").save(buf, format="JPEG")
  filters = preprocess.ImageOptions(size=16, min_side=64, max_aspect=3.0)
  if reason is None:
    assert _load(buf.getvalue(), options=filters).shape == (16, 16, 3)
  else:
    with pytest.raises(Dropped) as e:
      _load(buf.getvalue(), options=filters)
    assert e.value.reason == reason and "x.png" in e.value.detail
  assert _load(buf.getvalue()).shape == (16, 16, 3)  # off by default


def test_augmentation_only_with_rng_and_deterministic(media_dir):
  data = (media_dir / "good.png").read_bytes()
  plain = _load(data)
  assert preprocess.Augment.draw(None, OPTIONS) == preprocess.Augment()
  np.testing.assert_array_equal(_load(data, preprocess.Augment()), plain)
  draws = [preprocess.Augment.draw(np.random.default_rng([0, i]), OPTIONS) for i in range(40)]
  assert 5 < sum(d.flip for d in draws) < 35
  assert all(abs(d.brightness) <= 0.1 and abs(d.contrast - 1) <= 0.1 for d in draws)
  a = _load(data, draws[0])
  np.testing.assert_array_equal(
    a, _load(data, preprocess.Augment.draw(np.random.default_rng([0, 0]), OPTIONS))
  )
  assert not np.array_equal(a, plain)
  # Padding keeps pad_value under augmentation.
  np.testing.assert_allclose(a[0], np.broadcast_to([0.25, 0.5, 0.75], (16, 3)))


def _augment(x, augment):
  """float32 [h,w,3] in [0,1] through `render.augment` (which takes [0,255])."""
  return render.augment(tf.constant(x * 255.0), tf.constant(augment.as_array())).numpy()


def test_flip_mirrors_content():
  x = np.random.default_rng(0).random((3, 5, 3)).astype(np.float32)
  np.testing.assert_allclose(_augment(x, preprocess.Augment(flip=True)), x[:, ::-1], atol=1e-6)


@pytest.mark.parametrize("d, c, s", [(0.05, 1.1, 0.9), (-0.1, 0.9, 1.1), (0.0, 1.0, 0.5)])
def test_colour_jitter_matches_its_definition(d, c, s):
  luma = np.array([0.299, 0.587, 0.114], np.float32)
  x = np.random.default_rng(0).random((5, 7, 3)).astype(np.float32)
  y = x + d  # brightness
  m = (y @ luma).mean()
  y = (y - m) * c + m  # contrast around the mean luma
  g = (y @ luma)[..., None]
  y = (y - g) * s + g  # saturation around the pixel's luma
  got = _augment(x, preprocess.Augment(brightness=d, contrast=c, saturation=s))
  np.testing.assert_allclose(got, np.clip(y, 0, 1), atol=1e-5)


def test_mean_colour_weighs_every_image_alike_and_skips_bad_ones():
  def png(colour, size):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()

  mean = preprocess.mean_colour([png((255, 0, 0), (64, 64)), png((0, 255, 0), (8, 8)), b"not an image", b""])
  np.testing.assert_allclose(mean, (0.5, 0.5, 0.0), atol=1e-6)
  assert preprocess.mean_colour([]) == (0.5, 0.5, 0.5)


def _jpeg(w, h, **save):
  pixels = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels, "RGB").save(buf, format="JPEG", **save)
  return buf.getvalue()


def test_plain_jpeg_and_png_keep_their_bytes_and_jpegs_decode_at_a_covering_dct_scale(media_dir):
  options = preprocess.ImageOptions(size=100)
  data = _jpeg(900, 450)
  plan = preprocess.plan_image(data, missing=False, path="a.jpg", options=options)
  # 900x450 -> 100x50; 1/8 scale gives 113x57, which still covers it.
  assert (plan.data, plan.scale, plan.height, plan.width) == (data, 8, 50, 100)
  full = np.asarray(Image.open(io.BytesIO(data)).resize((100, 50), Image.Resampling.BILINEAR)) / 255.0
  got = render.load_image(data, missing=False, path="a.jpg", options=options)[25:75]
  assert np.abs(got - full).mean() < 0.05  # the DCT-scaled decode is a good downscale
  png = (media_dir / "good.png").read_bytes()
  assert preprocess.plan_image(png, missing=False, path="g.png", options=options).data == png


@pytest.mark.parametrize("name", ["rgba.png", "la.png", "cmyk.jpg", "gray16.png"])
def test_modes_tf_would_misread_are_handed_on_as_pil_decoded_pngs(media_dir, name):
  data = (media_dir / name).read_bytes()
  plan = preprocess.plan_image(data, missing=False, path=name, options=OPTIONS)
  assert plan.data != data and plan.data.startswith(b"\x89PNG") and (plan.height, plan.width) == (10, 16)


def test_exif_orientation_is_applied():
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise to display
  data = _jpeg(40, 20, exif=exif)
  x = _load(data, options=preprocess.ImageOptions(size=16, pad_value=(0.0, 0.0, 0.0)))
  # 40x20 stored, 20x40 displayed: content in the middle 8 columns, rows all image.
  assert np.abs(x[:, :4]).max() == 0.0 and np.abs(x[:, 4:12]).max() > 0.0


def test_a_truncated_jpeg_is_dropped_not_handed_to_tensorflow():
  data = _jpeg(64, 64)
  with pytest.raises(Dropped) as e:
    _load(data[: len(data) // 2])
  assert e.value.reason == "corrupt_image"
