"""The easy_vqa mixture: all datasets per step, shapes, state save/restore, two simulated hosts."""

import hashlib
import json

import ml_collections
import numpy as np
import pytest

from flamingo_jax.data import mixture
from tests.data.data_helpers import write_jsonl

STEPS = 20


def small_config():
  """The easy_vqa mixture on 16 records per split, tiny images, budgets for the byte tokenizer."""
  config = mixture.easy_vqa_mixture_config(max_examples=16, image_size=16)
  for name, batch, tokens in [
    ("m3w", 4, 96),
    ("pairs", 4, 32),
    ("vqa", 4, 80),
    ("vtp", 2, 64),
    ("bursty", 2, 320),
  ]:
    config.datasets[name].batch_size = batch
    config.datasets[name].max_tokens = tokens
  config.datasets.vtp.num_frames = 4
  return config


@pytest.fixture(scope="module")
def make(data_dir, tokenizer):
  def make_(seed=0, process_index=0, process_count=1, training=True):
    return mixture.make_mixture(
      small_config(),
      tokenizer,
      data_dir,
      seed=seed,
      process_index=process_index,
      process_count=process_count,
      training=training,
    )

  return make_


def digest(batches) -> str:
  h = hashlib.sha256()
  for name in sorted(batches):
    for key in sorted(batches[name]):
      h.update(f"{name}/{key}".encode())
      h.update(np.ascontiguousarray(batches[name][key]).tobytes())
  return h.hexdigest()


def test_config_schema():
  config = mixture.easy_vqa_mixture_config()
  assert {k: (d.kind, d.weight) for k, d in config.datasets.items()} == {
    "m3w": ("interleaved", 1.0),
    "pairs": ("pairs", 0.2),
    "vqa": ("pairs", 0.2),
    "vtp": ("video", 0.03),
    "bursty": ("interleaved", 1.0),
  }
  assert config.datasets.m3w.max_images == 5 and config.datasets.vtp.num_frames == 8
  assert config.datasets.bursty.max_images == 12 and config.datasets.bursty.p_next == 0.0
  with pytest.raises(KeyError, match="unknown key"):
    mixture.dataset_config(bach_size=3)


def test_every_dataset_every_step_static_shapes(make):
  m = make()
  assert m.weights == {"m3w": 1.0, "pairs": 0.2, "vqa": 0.2, "vtp": 0.03, "bursty": 1.0}
  want = {
    "m3w": (4, 5, 1, 96),
    "pairs": (4, 1, 1, 32),
    "vqa": (4, 1, 1, 80),
    "vtp": (2, 1, 4, 64),
    "bursty": (2, 12, 1, 320),
  }
  for _ in range(3):
    batches = next(m)
    assert set(batches) == set(want)
    for name, (b, n, f, t) in want.items():
      x = batches[name]
      assert x["images"].shape == (b, n, f, 16, 16, 3) and x["tokens"].shape == (b, t)
      assert x["images"].min() >= 0.0 and x["images"].max() <= 1.0
      assert x["media_mask"].any(1).all()  # no drops in easy_vqa
  assert all(v["dropped"] == 0 and v["examples"] == 3 * want[k][0] for k, v in m.metrics().items())


def test_restore_continues_exactly(make):
  a = make(seed=3)
  for _ in range(3):
    next(a)
  state = json.loads(json.dumps(a.get_state()))  # JSON-able
  assert state["step"] == 3
  want = [digest(next(a)) for _ in range(STEPS)]
  b = make(seed=3)
  next(b)  # an iterator somewhere else in the stream
  b.set_state(state)
  assert [digest(next(b)) for _ in range(STEPS)] == want
  with pytest.raises(ValueError, match="seed"):
    make(seed=4).set_state(state)


def test_seed_changes_the_stream(make):
  first = [digest(next(make(seed=s))) for s in (0, 0, 1)]
  assert first[0] == first[1] != first[2]


def test_two_hosts_split_the_one_host_stream(make):
  one = make()
  hosts = [make(process_index=p, process_count=2) for p in range(2)]
  rows = [[], []]
  for _ in range(4):  # pairs: 4 steps x 4 = one epoch of 16 records
    full = next(one)
    parts = [next(h) for h in hosts]
    for name in full:
      for key in full[name]:
        np.testing.assert_array_equal(
          np.concatenate([parts[0][name][key], parts[1][name][key]]), full[name][key]
        )
    for p in range(2):
      rows[p] += [hashlib.sha256(x.tobytes()).hexdigest() for x in parts[p]["pairs"]["images"]]
  assert len(set(rows[0]) | set(rows[1])) == 16 and not set(rows[0]) & set(rows[1])


def test_eval_mode_has_no_randomness(make, tokenizer):
  a, b = make(training=False), make(training=False, seed=7)
  x, y = next(a), next(b)
  assert digest(x) == digest(y)  # eval ignores the seed: records in order, no augmentation
  space = tokenizer.encode(" ")[0]
  assert not (x["pairs"]["tokens"][:, 2] == space).any()  # no leading space


def test_users_jsonl_data_through_the_config(media_dir, data_dir, tokenizer):
  path = write_jsonl(
    media_dir / "user_pairs.jsonl",
    [
      {"image": n, "text": f"photo {i}"}
      for i, n in enumerate(["good.png", "gray.png", "cmyk.jpg", "wide.jpg"])
    ],
  )
  config = ml_collections.ConfigDict(
    {"prepare": True, "num_parallel_calls": 2, "prefetch": 1, "datasets": {}}
  )
  config.datasets.laion = mixture.dataset_config(
    builder="image_text_jsonl",
    builder_kwargs={"name": "user_pairs", "sources": {"train": path}},
    batch_size=2,
    max_tokens=24,
    image_size=8,
    weight=0.2,
  )
  with mixture.make_mixture(config, tokenizer, data_dir, process_index=0, process_count=1) as m:
    batch = next(m)["laion"]
  assert batch["images"].shape == (2, 1, 1, 8, 8, 3) and batch["token_mask"].any(1).all()


def test_pad_with_mean_pads_with_the_datasets_mean_colour(media_dir, data_dir, tokenizer):
  from PIL import Image  # pylint: disable=g-import-not-at-top

  for name, colour in (("red.png", (255, 0, 0)), ("blue.png", (0, 0, 255))):
    Image.new("RGB", (16, 8), colour).save(media_dir / name)  # 16x8: padded rows above and below
  path = write_jsonl(
    media_dir / "two_colours.jsonl", [{"image": "red.png", "text": "r"}, {"image": "blue.png", "text": "b"}]
  )
  config = ml_collections.ConfigDict(
    {"prepare": True, "num_parallel_calls": 1, "prefetch": 1, "datasets": {}}
  )
  config.datasets.pairs = mixture.dataset_config(
    builder="image_text_jsonl",
    builder_kwargs={"name": "two_colours", "sources": {"train": path}},
    batch_size=2,
    max_tokens=8,
    image_size=8,
    pad_with_mean=True,
  )
  with mixture.make_mixture(
    config, tokenizer, data_dir, process_index=0, process_count=1, training=False
  ) as m:
    images = next(m)["pairs"]["images"][:, 0, 0]
  np.testing.assert_allclose(images[:, 0, 0], [[0.5, 0.0, 0.5]] * 2, atol=1e-6)  # the corner: padding
  np.testing.assert_allclose(images[0, 4, 4], [1.0, 0.0, 0.0], atol=1e-6)  # the image itself
