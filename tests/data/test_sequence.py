"""Token sequences -> tokens/targets/loss_mask/token_mask and phi (media_index), incl. p_next."""

import numpy as np
import pytest

from flamingo_jax.data import sequence

IMG, EOC, BOS, EOS, PAD = 9, 8, 1, 2, 0


def _arrays(seq, T=10, attend_next=False):
  return sequence.text_arrays(seq, max_tokens=T, pad_id=PAD, image_id=IMG, attend_next=attend_next)


def test_targets_masks_and_padding():
  seq = [BOS, IMG, 5, 6, EOC, EOS]
  a = _arrays(seq, T=8)
  np.testing.assert_array_equal(a["tokens"], [BOS, IMG, 5, 6, EOC, PAD, PAD, PAD])
  np.testing.assert_array_equal(a["targets"], [IMG, 5, 6, EOC, EOS, PAD, PAD, PAD])
  np.testing.assert_array_equal(a["token_mask"], [1, 1, 1, 1, 1, 0, 0, 0])
  # Loss on text, <EOC> and <EOS>; never on the <image> marker as a target, never on padding.
  np.testing.assert_array_equal(a["loss_mask"], [0, 1, 1, 1, 1, 0, 0, 0])
  assert a["loss_mask"].dtype == np.float32 and a["tokens"].dtype == np.int32
  with pytest.raises(ValueError):
    _arrays(seq, T=4)


def test_phi_previous_image():
  #        BOS a  IMG b  c  EOC IMG d  EOC (EOS)
  seq = [BOS, 5, IMG, 6, 7, EOC, IMG, 4, EOC, EOS]
  a = _arrays(seq, T=12)
  np.testing.assert_array_equal(a["media_index"], [-1, -1, 0, 0, 0, 0, 1, 1, 1, -1, -1, -1])


def test_phi_next_image():
  seq = [BOS, 5, IMG, 6, 7, EOC, IMG, 4, EOC, EOS]
  a = _arrays(seq, T=12, attend_next=True)
  # Before the first image -> image 0; a marker attends to its own image; after the last: -1.
  np.testing.assert_array_equal(a["media_index"], [0, 0, 0, 1, 1, 1, 1, -1, -1, -1, -1, -1])


@pytest.mark.parametrize("attend_next", [False, True])
def test_phi_matches_the_model_masking(attend_next):
  from flamingo_jax.models import masking  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for _ in range(20):
    n = int(rng.integers(2, 16))
    seq = [BOS] + rng.choice([5, 6, IMG], size=n).tolist()
    a = _arrays(seq, T=16, attend_next=attend_next)
    want = np.asarray(masking.media_index_from_tokens(a["tokens"][None], IMG, attend_next))[0]
    real = a["token_mask"]
    np.testing.assert_array_equal(a["media_index"][real], want[real])
    assert (a["media_index"][~real] == -1).all()


def test_empty_example_has_no_media_tokens_or_loss():
  e = sequence.empty_example(max_tokens=6, max_images=2, num_frames=3, pad_id=PAD)
  assert e["image_data"].shape == (2, 3) and set(e["image_data"].flat) == {b""}  # renders as zeros
  assert not e["media_mask"].any() and not e["token_mask"].any() and not e["loss_mask"].any()
  assert (e["media_index"] == -1).all()


def test_drop_reasons_are_checked():
  with pytest.raises(ValueError, match="unknown drop reason"):
    sequence.Dropped("typo", "x")
  assert sequence.reason_code(sequence.DROP_REASONS[0]) == 1
  assert sequence.note_bits("truncated_tokens", "truncated_images") == 3
