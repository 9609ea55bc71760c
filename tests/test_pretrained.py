"""Tests of flamingo_jax.pretrained helpers that need no LM file."""

import numpy as np

from flamingo_jax import pretrained


def _params(tied: bool):
  rng = np.random.default_rng(0)
  params = {
    "lm/embed": {"embeddings": rng.normal(size=(6, 4)).astype(np.float32)},
    "lm/extra_embed": {"embeddings": rng.normal(size=(2, 4)).astype(np.float32)},
    "perceiver_resampler": {"latents": rng.normal(size=(3, 4)).astype(np.float32)},
  }
  if not tied:
    params["lm/unembed"] = {"w": rng.normal(size=(4, 6)).astype(np.float32)}
    params["lm/extra_unembed"] = {"w": rng.normal(size=(4, 2)).astype(np.float32)}
  return params


def test_new_token_rows_start_from_the_lm_rows_tied():
  params = _params(tied=True)
  out = pretrained.init_new_token_rows(params, end_id=2)
  extra = out["lm/extra_embed"]["embeddings"]
  np.testing.assert_allclose(extra[0], params["lm/embed"]["embeddings"].mean(axis=0), rtol=1e-6)
  np.testing.assert_array_equal(extra[1], params["lm/embed"]["embeddings"][2])
  assert extra.dtype == np.float32
  # Nothing else changes, and the input is not modified in place.
  np.testing.assert_array_equal(
    out["perceiver_resampler"]["latents"], params["perceiver_resampler"]["latents"]
  )
  assert not np.array_equal(params["lm/extra_embed"]["embeddings"][1], extra[1])


def test_new_token_rows_start_from_the_lm_rows_untied():
  params = _params(tied=False)
  out = pretrained.init_new_token_rows(params, end_id=5)
  w = out["lm/extra_unembed"]["w"]
  np.testing.assert_allclose(w[:, 0], params["lm/unembed"]["w"].mean(axis=1), rtol=1e-6)
  np.testing.assert_array_equal(w[:, 1], params["lm/unembed"]["w"][:, 5])
  np.testing.assert_array_equal(out["lm/extra_embed"]["embeddings"][1], params["lm/embed"]["embeddings"][5])
