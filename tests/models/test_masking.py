"""Hand cases of phi (`media_index_from_tokens`): previous image, next image (p_next), mixed per sequence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import masking

I = 9  # the <image> id in these hand cases

# Two markers and text around them; a sequence that starts with a marker; one with no marker at all.
TOKENS = np.array(
  [
    [1, 2, I, 3, 4, I, 5, 6],
    [I, 3, I, I, 4, 5, 6, 7],
    [1, 2, 3, 4, 5, 6, 7, 8],
  ],
  np.int32,
)
PREVIOUS = [
  [-1, -1, 0, 0, 0, 1, 1, 1],
  [0, 0, 1, 2, 2, 2, 2, 2],
  [-1] * 8,
]
NEXT = [
  [0, 0, 0, 1, 1, 1, -1, -1],
  [0, 1, 1, 2, -1, -1, -1, -1],
  [-1] * 8,
]

_phi = jax.jit(masking.media_index_from_tokens, static_argnums=1)


def test_previous_image():
  phi = _phi(TOKENS, I)
  assert phi.dtype == np.int32 and phi.shape == TOKENS.shape
  np.testing.assert_array_equal(phi, PREVIOUS)


def test_next_image():
  np.testing.assert_array_equal(_phi(TOKENS, I, True), NEXT)


def test_marker_attends_to_its_own_image_in_both_modes():
  is_marker = TOKENS == I
  markers_so_far = np.cumsum(is_marker, axis=1) - 1
  for attend_next in (False, True):
    phi = np.asarray(_phi(TOKENS, I, attend_next))
    np.testing.assert_array_equal(phi[is_marker], markers_so_far[is_marker])


@pytest.mark.parametrize("choice", [(True, False, True), (False, True, False), (True, True, False)])
def test_per_sequence_attend_next_mixes_both_modes(choice):
  phi = _phi(TOKENS, I, np.array(choice))
  want = [NEXT[b] if nxt else PREVIOUS[b] for b, nxt in enumerate(choice)]
  np.testing.assert_array_equal(phi, want)


def test_single_token_sequences():
  tokens = np.array([[I], [1]], np.int32)
  np.testing.assert_array_equal(_phi(tokens, I), [[0], [-1]])
  np.testing.assert_array_equal(_phi(tokens, I, True), [[0], [-1]])


def test_eos_reset_rule_of_idefics():
  """`reset_id`: after an end of sequence (kept by the EOS itself) no image until the next marker;
  numpy (the pipelines) and jax (the model) agree."""
  tokens = np.array([[5, 9, 5, 2, 5, 9, 2, 9, 5], [2, 5, 9, 5, 5, 2, 2, 5, 9]])
  want = np.array([[-1, 0, 0, 0, -1, 1, 1, 2, 2], [-1, -1, 0, 0, 0, 0, -1, -1, 1]])
  np.testing.assert_array_equal(masking.media_index_from_tokens(tokens, 9, reset_id=2), want)
  np.testing.assert_array_equal(masking.media_index_from_tokens(jnp.asarray(tokens), 9, reset_id=2), want)
