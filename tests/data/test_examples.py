"""Per-example processing: pairs, interleaved documents (budgets, truncation), video clips."""

import numpy as np
import pytest
import scipy.stats

from flamingo_jax.data import interleaved, pairs, preprocess, render, sequence, video
from flamingo_jax.data.sequence import Dropped

OPTS = preprocess.ImageOptions(size=8)


def _img(media_dir, name):
  path = media_dir / name
  return path.read_bytes() if path.exists() else b""


def _doc(media_dir, text, names):
  return {
    "text": text.encode(),
    "images": [_img(media_dir, n) for n in names],
    "image_paths": [n.encode() for n in names],
    "image_missing": [not (media_dir / n).exists() for n in names],
  }


# -- pairs ---------------------------------------------------------------------------------------


def _pair(media_dir, text, name="good.png", **fields):
  return {
    "image": _img(media_dir, name),
    "image_path": name.encode(),
    "image_missing": not (media_dir / name).exists(),
    "text": text.encode(),
    **fields,
  }


def test_pair_sequence_and_leading_space(media_dir, tokenizer):
  ex = _pair(media_dir, "a red circle")
  out, notes = pairs.process_pair(ex, None, tokenizer=tokenizer, image_options=OPTS, max_tokens=20)
  t = tokenizer
  want = [t.bos_id, t.image_id, *t.encode("a red circle"), t.eoc_id]
  assert out["tokens"][: len(want)].tolist() == want and notes == 0
  assert out["targets"][len(want) - 1] == t.eos_id
  assert render.render_example(out, OPTS)["images"].shape == (1, 1, 8, 8, 3)
  assert out["media_mask"].tolist() == [True]
  spaces = [
    pairs.process_pair(ex, np.random.default_rng(i), tokenizer=t, image_options=OPTS, max_tokens=20)[0][
      "tokens"
    ][2]
    == t.encode(" ")[0]
    for i in range(40)
  ]
  assert 8 < sum(spaces) < 32  # p = 0.5 in training only


def test_pair_loss_from_answer(media_dir, tokenizer):
  kw = dict(
    tokenizer=tokenizer,
    image_options=OPTS,
    max_tokens=24,
    text_template="Q: {question} A: {answer}",
    loss_from="answer",
  )
  ex = _pair(media_dir, "", question=b"what?", answer=b"no")
  fresh_rng = lambda seed: None if seed is None else np.random.default_rng(seed)
  for seed in [None, 0, 1, 2, 3, 4, 5]:  # eval, and training with and without the leading space
    out, _ = pairs.process_pair(ex, fresh_rng(seed), **kw)
    on = out["loss_mask"] > 0
    # ' no', <EOC>, <EOS>: the answer's 3 bytes and the two end tokens; the question is given.
    assert on.sum() == 5 and tokenizer.decode(out["targets"][on][:3]) == " no"
    full, _ = pairs.process_pair(ex, fresh_rng(seed), **{**kw, "loss_from": ""})
    np.testing.assert_array_equal(full["tokens"], out["tokens"])
    assert full["loss_mask"].sum() > on.sum()
  with pytest.raises(KeyError, match="loss_from 'nope'"):
    pairs.process_pair(ex, None, **{**kw, "loss_from": "nope"})


def test_pair_template_and_bad_text(media_dir, tokenizer):
  kw = dict(tokenizer=tokenizer, image_options=OPTS, max_tokens=12)
  ex = _pair(media_dir, "", question=b"what?", answer=b"no")
  out, _ = pairs.process_pair(ex, None, text_template="Q: {question} A: {answer}", **{**kw, "max_tokens": 20})
  assert tokenizer.decode(out["tokens"][2:16]) == "Q: what? A: no"
  with pytest.raises(KeyError, match="needs field 'nope'"):
    pairs.process_pair(ex, None, text_template="{nope}", **kw)
  for text, reason in [
    ("", "empty_text"),
    ("x" * 12, "text_too_long"),
    ("an <image> here", "image_count_mismatch"),
  ]:
    with pytest.raises(Dropped) as e:
      pairs.process_pair(_pair(media_dir, text), None, **kw)
    assert e.value.reason == reason
  with pytest.raises(Dropped, match="corrupt_image"):
    pairs.process_pair(_pair(media_dir, "ok", "corrupt.png"), None, **kw)


# -- interleaved ---------------------------------------------------------------------------------


def test_document_sequence_places_eoc(tokenizer):
  t = tokenizer
  seq, long = interleaved.document_sequence("A cat. <image> It sleeps. ", t, max_len=100)
  assert (
    seq == [t.bos_id, *t.encode("A cat."), t.eoc_id, t.image_id, *t.encode(" It sleeps."), t.eoc_id, t.eos_id]
    and not long
  )
  seq, _ = interleaved.document_sequence("<image> x <image><image> y", t, max_len=100)
  assert seq == [
    t.bos_id,
    t.image_id,
    *t.encode(" x"),
    t.eoc_id,
    t.image_id,
    t.image_id,
    *t.encode(" y"),
    t.eoc_id,
    t.eos_id,
  ]


def _process_doc(doc, tokenizer, T=40, N=2, rng=None, p_next=0.0):
  return interleaved.process_document(
    doc, rng, tokenizer=tokenizer, image_options=OPTS, max_tokens=T, max_images=N, p_next=p_next
  )


def test_image_budget_cuts_before_the_first_dropped_image(media_dir, tokenizer):
  doc = _doc(
    media_dir, "<image> a <image> b <image> c <image> d", ["good.png", "gray.png", "rgba.png", "corrupt.png"]
  )  # corrupt one never decoded
  out, notes = _process_doc(doc, tokenizer, N=2)
  assert notes == sequence.note_bits("truncated_images")
  real = out["tokens"][out["token_mask"]].tolist()
  text = tokenizer.decode(real + [out["targets"][out["token_mask"]][-1]])
  assert text == "<BOS><image> a<EOC><image> b<EOC>"  # nothing after image 2 remains
  assert out["media_mask"].tolist() == [True, True]
  assert out["media_index"][out["token_mask"]].max() == 1


def test_token_budget(media_dir, tokenizer):
  doc = _doc(media_dir, "<image> " + "long text " * 10, ["good.png"])
  out, notes = _process_doc(doc, tokenizer, T=16)
  assert notes == sequence.note_bits("truncated_tokens") and out["token_mask"].all()
  assert out["loss_mask"].sum() == 15  # every target but the <image> marker
  # The only image comes after the budget: nothing to attend to -> dropped.
  doc = _doc(media_dir, "long text " * 10 + "<image> end", ["good.png"])
  with pytest.raises(Dropped, match="no_image_in_budget"):
    _process_doc(doc, tokenizer, T=16)
  # A budget ending right after a marker leaves no dangling marker.
  doc = _doc(media_dir, "<image> abcdef <image> tail", ["good.png", "gray.png"])
  out, _ = _process_doc(doc, tokenizer, T=10)  # [BOS IMG ' abcdef' EOC] = 10 ids, next IMG cut
  assert out["media_mask"].tolist() == [True, False]
  assert out["tokens"].tolist().count(tokenizer.image_id) == 1


@pytest.mark.parametrize(
  "text, names, reason",
  [
    ("no images here", [], "no_image"),
    ("<image> one <image> two", ["good.png"], "image_count_mismatch"),
    ("<image> one", ["good.png", "gray.png"], "image_count_mismatch"),
    ("<image> <image>", ["good.png", "gray.png"], "empty_text"),
    ("<image> x", ["corrupt.png"], "corrupt_image"),
    ("<image> x", ["missing.png"], "missing_image"),
    ("<image> x", ["empty.png"], "empty_image"),
  ],
)
def test_bad_documents_are_dropped(media_dir, tokenizer, text, names, reason):
  with pytest.raises(Dropped) as e:
    _process_doc(_doc(media_dir, text, names), tokenizer)
  assert e.value.reason == reason


def test_p_next_in_training_only(media_dir, tokenizer):
  doc = _doc(media_dir, "x <image> a <image> b", ["good.png", "gray.png"])
  first = [
    (_process_doc(doc, tokenizer, rng=np.random.default_rng(i), p_next=0.5)[0]["media_index"][0])
    for i in range(40)
  ]
  assert set(first) == {-1, 0} and 8 < sum(f == 0 for f in first) < 32
  assert _process_doc(doc, tokenizer, p_next=1.0)[0]["media_index"][0] == -1  # eval: previous


def test_window_starts_are_exactly_the_windows_that_keep_an_image(tokenizer):
  t, rng = tokenizer, np.random.default_rng(0)
  for _ in range(200):  # random id sequences, checked against `truncate` on every window
    body = rng.choice([t.image_id, 40, 41, t.eoc_id], size=int(rng.integers(1, 30)), p=[0.3, 0.3, 0.3, 0.1])
    seq = [t.bos_id, *body.tolist(), t.eos_id]
    max_len, max_images = int(rng.integers(3, 12)), int(rng.integers(1, 4))
    expected = []
    for s in range(max(0, len(seq) - max_len) + 1):
      window, _ = interleaved.truncate(
        seq[:1] + seq[1 + s :], image_id=t.image_id, max_len=max_len, max_images=max_images
      )
      if window.count(t.image_id) and len(window) >= 2:
        expected.append(s)
    if len(seq) <= max_len:  # the whole document is the one window (process_document checks it)
      expected = [0]
    found = interleaved.window_starts(seq, image_id=t.image_id, max_len=max_len, max_images=max_images)
    assert found == expected, (seq, max_len, max_images)


def test_training_window_is_uniform_over_the_valid_starts_and_carries_its_images(media_dir, tokenizer):
  # Distinct characters: a window's text tells where it starts; distinct images: which image is first.
  chunks = ["abcdefgh", "ijklmnop", "qrstuvwx", "yzABCDEF"]
  names = ["f0.png", "f1.png", "f2.png", "f3.png"]
  doc = _doc(media_dir, "".join(f"<image>{c}" for c in chunks), names)
  full, _, _ = interleaved.segment_sequence(
    [(doc["text"].decode(), True)], tokenizer, max_len=10**6, markup_loss=True
  )
  T = 12
  starts = interleaved.window_starts(full, image_id=tokenizer.image_id, max_len=T + 1, max_images=2)
  assert len(starts) > 20
  encoded = [_img(media_dir, n) for n in names]  # the plans carry these PNGs as they are
  counts = dict.fromkeys(starts, 0)
  draws = 40 * len(starts)
  rng = np.random.default_rng(0)
  still = preprocess.ImageOptions(size=8, flip=False, brightness=0.0, contrast=0.0, saturation=0.0)
  for _ in range(draws):
    out, _ = interleaved.process_document(
      doc, rng, tokenizer=tokenizer, image_options=still, max_tokens=T, max_images=2
    )
    ids = out["tokens"][out["token_mask"]].tolist()
    assert ids[0] == tokenizer.bos_id
    start = next(s for s in starts if full[1 + s : 1 + s + len(ids) - 1] == ids[1:])
    counts[start] += 1
    first = full[1 : 1 + start].count(tokenizer.image_id)  # images before the window
    assert out["image_data"][0, 0] == encoded[first]
  assert scipy.stats.chisquare(list(counts.values())).pvalue > 1e-3
  # Evaluation keeps the first window, and draws nothing.
  out, _ = _process_doc(doc, tokenizer, T=T, N=2)
  assert out["tokens"][out["token_mask"]].tolist() == full[:T]


def test_a_document_whose_image_lies_past_the_budget_trains_on_a_later_window(media_dir, tokenizer):
  doc = _doc(media_dir, "long text " * 10 + "<image> end", ["good.png"])
  out, notes = _process_doc(doc, tokenizer, T=16, rng=np.random.default_rng(0))
  assert out["media_mask"].tolist() == [True, False] and tokenizer.image_id in out["tokens"].tolist()
  assert notes == sequence.note_bits("truncated_tokens") or notes == 0
  with pytest.raises(Dropped, match="no_image_in_budget"):  # evaluation reads the first ids only
    _process_doc(doc, tokenizer, T=16)
  with pytest.raises(Dropped, match="no_image_in_budget"):  # and so does training with window='first'
    interleaved.process_document(
      doc,
      np.random.default_rng(0),
      tokenizer=tokenizer,
      image_options=OPTS,
      max_tokens=16,
      max_images=2,
      window="first",
    )


# -- video ---------------------------------------------------------------------------------------


def test_frame_indices():
  np.testing.assert_array_equal(video.frame_indices(3, 5), [0, 0, 1, 2, 2])
  np.testing.assert_array_equal(video.frame_indices(4, 4), [0, 1, 2, 3])
  for seed in range(10):
    idx = video.frame_indices(30, 4, np.random.default_rng(seed))
    assert (np.diff(idx) > 0).all() and idx[0] >= 0 and idx[-1] < 30


def _clip(media_dir, names, text="a clip"):
  return {
    "frames": [_img(media_dir, n) for n in names],
    "frame_paths": [n.encode() for n in names],
    "frame_missing": [not (media_dir / n).exists() for n in names],
    "text": text.encode(),
  }


def test_clip_frames_and_drops(media_dir, tokenizer):
  kw = dict(tokenizer=tokenizer, image_options=OPTS, max_tokens=20, num_frames=4)
  names = ["f0.png", "f1.png", "f2.png", "f3.png"]
  out, _ = video.process_clip(_clip(media_dir, names), None, **kw)
  images = render.render_example(out, OPTS)["images"]
  assert images.shape == (1, 4, 8, 8, 3)
  for t, name in enumerate(names):
    np.testing.assert_array_equal(
      images[0, t], render.load_image(_img(media_dir, name), missing=False, path=name, options=OPTS)
    )
  out, _ = video.process_clip(_clip(media_dir, names[:2]), None, **kw)  # 2 frames -> 4
  images = render.render_example(out, OPTS)["images"]
  np.testing.assert_array_equal(images[0, 0], images[0, 1])
  with pytest.raises(Dropped, match="no_image"):
    video.process_clip(_clip(media_dir, []), None, **kw)
  with pytest.raises(Dropped, match="corrupt_image"):
    video.process_clip(_clip(media_dir, ["f0.png", "corrupt.png"]), None, **kw)
