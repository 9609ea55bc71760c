"""Binding episodes, word lists and bursty documents (flamingo_jax/data/binding.py)."""

import itertools

import numpy as np
import pytest

from flamingo_jax.data import binding, interleaved, preprocess

COLORS = ("red", "blue", "green", "teal")
SHAPES = ("circle", "triangle", "rectangle")


@pytest.fixture(scope="module")
def pool():
  images = [(f"test/{c}-{s}-{i}", c, s) for c, s in itertools.product(COLORS, SHAPES) for i in range(12)]
  return binding.class_pool(images, "shape_color")


@pytest.fixture(scope="module")
def names():
  return binding.read_word_list(binding.default_word_list("eval"))


@pytest.mark.parametrize("n_way,k_shot", [(2, 1), (3, 2), (5, 4)])
@pytest.mark.parametrize("index", range(5))
def test_episode_construction(pool, names, n_way, k_shot, index):
  e = binding.make_episode(pool, names, n_way=n_way, k_shot=k_shot, seed=3, index=index)
  assert len(set(e.classes)) == n_way and len(set(e.names)) == n_way
  counts = np.bincount([c for _, c in e.support], minlength=n_way)
  assert counts.tolist() == [k_shot] * n_way
  assert 0 <= e.query_class < n_way and e.answer == e.names[e.query_class]
  assert e.query in pool[e.classes[e.query_class]]
  refs = [r for r, _ in e.support]
  assert len(set(refs)) == len(refs) and e.query not in refs
  for (ref, c), shown in zip(e.support, e.shown):
    assert ref in pool[e.classes[c]] and shown == e.names[c]
  text, media = e.prompt()
  assert media == tuple(refs) + (e.query,)
  assert text.count("<image>") == len(media) and text.endswith("<image>This is a")
  assert text.startswith(f"<image>This is a {e.shown[0]}.<EOC>")


def test_episodes_are_deterministic_and_vary(pool, names):
  make = lambda seed, index: binding.make_episode(pool, names, n_way=3, k_shot=2, seed=seed, index=index)
  assert make(0, 7) == make(0, 7)
  assert len({make(0, i) for i in range(20)}) == 20
  assert make(0, 7) != make(1, 7)


@pytest.mark.parametrize("n_way,k_shot", [(2, 1), (3, 2), (5, 4)])
def test_controls_share_the_episode(pool, names, n_way, k_shot):
  for index in range(10):
    base = binding.make_episode(pool, names, n_way=n_way, k_shot=k_shot, seed=0, index=index)
    shuffled = binding.make_episode(
      pool, names, n_way=n_way, k_shot=k_shot, seed=0, index=index, control="shuffled"
    )
    real = binding.make_episode(
      pool, names, n_way=n_way, k_shot=k_shot, seed=0, index=index, control="real_names"
    )
    assert shuffled.support == base.support and shuffled.query == base.query
    assert shuffled.answer == base.answer
    # Truly mismatched: no image is shown with its class's name, and a class keeps one name.
    for (_, c), shown in zip(shuffled.support, shuffled.shown):
      assert shown != shuffled.names[c] and shown in shuffled.names
    by_class = {}
    for (_, c), shown in zip(shuffled.support, shuffled.shown):
      by_class.setdefault(c, set()).add(shown)
    assert all(len(v) == 1 for v in by_class.values())
    assert len({next(iter(v)) for v in by_class.values()}) == n_way
    assert real.names == real.classes and real.answer == base.classes[base.query_class]
    assert real.support == base.support


def test_episode_needs_enough_classes(pool, names):
  with pytest.raises(ValueError, match="5-way 12-shot needs"):
    binding.make_episode(pool, names, n_way=5, k_shot=12, seed=0, index=0)
  with pytest.raises(ValueError, match="control"):
    binding.make_episode(pool, names, n_way=2, k_shot=1, seed=0, index=0, control="swap")


def test_class_modes():
  assert binding.class_of("red", "circle", "shape_color") == "red circle"
  assert binding.class_of("red", "circle", "shape") == "circle"
  assert binding.class_of("red", "circle", "color") == "red"
  with pytest.raises(ValueError, match="class mode"):
    binding.class_of("red", "circle", "size")


def test_packaged_word_lists_are_disjoint():
  train = binding.read_word_list(binding.default_word_list("train"))
  evaluation = binding.read_word_list(binding.default_word_list("eval"))
  binding.check_disjoint(train, evaluation)
  assert len(train) >= 100 and len(evaluation) >= 50


def test_overlapping_word_lists_name_the_shared_words(tmp_path):
  train, evaluation = tmp_path / "train.txt", tmp_path / "eval.txt"
  train.write_text("dax\nwug\nfep\nzup\ntoma\n")
  evaluation.write_text("kiki\nwug\nbouba\ndax\nmipo\n")
  with pytest.raises(ValueError, match=r"share 2 words: \['dax', 'wug'\]") as e:
    binding.check_disjoint(
      binding.read_word_list(str(train)),
      binding.read_word_list(str(evaluation)),
      train_path=str(train),
      eval_path=str(evaluation),
    )
  assert str(train) in str(e.value) and str(evaluation) in str(e.value)


def test_bad_word_lists_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    binding.read_word_list(str(tmp_path / "nope.txt"))
  bad = tmp_path / "bad.txt"
  bad.write_text("dax\ntwo words\n")
  with pytest.raises(ValueError, match="bad.txt:2"):
    binding.read_word_list(str(bad))
  bad.write_text("dax\ndax\nwug\nfep\nzup\ntoma\n")
  with pytest.raises(ValueError, match="repeated"):
    binding.read_word_list(str(bad))


def test_bursty_documents(pool):
  names = binding.read_word_list(binding.default_word_list("train"))
  for key in range(30):
    segments, refs = binding.bursty_document(pool, names, key=key, max_images=12)
    assert segments == binding.bursty_document(pool, names, key=key, max_images=12)[0]
    text = binding.document_text(segments)
    assert text.count("<image>") == len(refs) and 4 <= len(refs) <= 12
    assert len(set(refs)) == len(refs)
    named = [s for s in segments if s.text.startswith(" ")]
    assert len(named) == len(refs)
    seen = set()
    for s in named:
      assert s.loss == (s.text in seen)  # loss on a name only after its first occurrence
      seen.add(s.text)
    assert 2 <= len(seen) <= 5 and all(not s.loss for s in segments if s not in named)


def test_a_dropped_image_changes_only_the_bursty_documents_that_showed_it(pool):
  names = binding.read_word_list(binding.default_word_list("train"))
  dropped = pool["red circle"][3]
  smaller = {c: tuple(r for r in refs if r != dropped) for c, refs in pool.items()}
  changed = 0
  for key in range(60):
    full = binding.bursty_document(pool, names, key=key, max_images=12)
    if dropped in full[1]:
      changed += 1
      assert dropped not in binding.bursty_document(smaller, names, key=key, max_images=12)[1]
    else:
      assert binding.bursty_document(smaller, names, key=key, max_images=12) == full
  assert changed  # the check above ran on both kinds of document


def _bursty_example(segments, refs, image):
  return {
    "text": binding.document_text(segments),
    "segments": [s.text for s in segments],
    "segment_loss": [s.loss for s in segments],
    "images": [image] * len(refs),
    "image_paths": list(refs),
    "image_missing": [False] * len(refs),
  }


def test_bursty_loss_falls_on_repeated_names_only(tokenizer):
  from tests.data.data_helpers import image_bytes  # pylint: disable=g-import-not-at-top

  segments = [
    binding.Segment("<image>This is a"),
    binding.Segment(" dax"),
    binding.Segment("."),
    binding.Segment("<image>This is a"),
    binding.Segment(" wug"),
    binding.Segment("."),
    binding.Segment("<image>This is a"),
    binding.Segment(" dax", loss=True),
    binding.Segment("."),
  ]
  example = _bursty_example(segments, ["a", "b", "c"], image_bytes())
  arrays, _ = interleaved.process_document(
    example,
    None,
    tokenizer=tokenizer,
    image_options=preprocess.ImageOptions(size=8),
    max_tokens=80,
    max_images=4,
  )
  targets = arrays["targets"][arrays["loss_mask"] > 0]
  assert tokenizer.decode(targets) == " dax"
  # The same document without segments has the plain documents' loss (every text token).
  plain = {k: v for k, v in example.items() if k not in ("segments", "segment_loss")}
  arrays_plain, _ = interleaved.process_document(
    plain,
    None,
    tokenizer=tokenizer,
    image_options=preprocess.ImageOptions(size=8),
    max_tokens=80,
    max_images=4,
  )
  np.testing.assert_array_equal(arrays_plain["tokens"], arrays["tokens"])
  np.testing.assert_array_equal(arrays_plain["media_index"], arrays["media_index"])
  assert arrays_plain["loss_mask"].sum() > 30


def test_segments_must_spell_the_text(tokenizer):
  from tests.data.data_helpers import image_bytes  # pylint: disable=g-import-not-at-top

  segments = [binding.Segment("<image>This is a"), binding.Segment(" dax", loss=True)]
  example = dict(_bursty_example(segments, ["a"], image_bytes()), text="<image>This is a wug")
  with pytest.raises(interleaved.Dropped, match="segments"):
    interleaved.process_document(
      example,
      None,
      tokenizer=tokenizer,
      image_options=preprocess.ImageOptions(size=8),
      max_tokens=80,
      max_images=4,
    )
