"""Tests for the BERT-style text encoder."""

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models.text_encoder import TextEncoder

V, D, L, H, MAX_LEN = 50, 32, 2, 4, 12


def _key(seed):
  # RBG keys: XLA:CPU compiles threefry-based initialisation ~5x slower.
  return jax.random.key(seed, impl="rbg")


# Compile-time bound on CPU: cheaper XLA backend passes halve compile time
# (numerics are unchanged up to float reassociation).
_jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


def _model(**kwargs):
  args = dict(vocab_size=V, dim=D, num_layers=L, num_heads=H, max_len=MAX_LEN)
  args.update(kwargs)
  return hk.transform(lambda t, m: TextEncoder(**args)(t, m, is_training=False))


@pytest.fixture(scope="module")
def encoder():
  model = _model()
  tokens = jax.random.randint(_key(0), (3, 6), 1, V)
  lengths = jnp.array([6, 3, 1])
  mask = jnp.arange(6)[None, :] < lengths[:, None]
  params = _jit(model.init)(_key(1), tokens, mask)
  return _jit(model.apply), params, tokens, mask


def test_shapes_and_param_paths(encoder):
  apply, params, tokens, mask = encoder
  out = apply(params, None, tokens, mask)
  chex.assert_shape(out["tokens"], (3, 6, D))
  chex.assert_shape(out["pooled"], (3, D))
  chex.assert_type([out["tokens"], out["pooled"]], jnp.float32)
  chex.assert_tree_all_finite(out)
  assert set(params) == {
    "text_encoder/token_embed",
    "text_encoder/pos_embed",
    "text_encoder/layers/block",
    "text_encoder/final_norm",
  }
  block = params["text_encoder/layers/block"]
  chex.assert_shape([block["q"], block["k"], block["v"], block["o"]], (L, D, D))
  chex.assert_shape(block["mlp_in"], (L, D, 4 * D))
  chex.assert_shape(block["mlp_out"], (L, 4 * D, D))
  chex.assert_shape(params["text_encoder/pos_embed"]["embeddings"], (MAX_LEN, D))
  # Pooled = mean of the valid token outputs; padded outputs are 0.
  valid = np.asarray(mask)[..., None]
  np.testing.assert_allclose(
    out["pooled"], (out["tokens"] * valid).sum(1) / valid.sum(1), rtol=1e-5, atol=1e-6
  )
  np.testing.assert_array_equal(np.asarray(out["tokens"])[~np.asarray(mask)], 0.0)


def test_padding_invariance(encoder):
  apply, params, tokens, mask = encoder
  ref = apply(params, None, tokens, mask)
  # Extra padding with arbitrary ids, on the right and on the left.
  garbage = jax.random.randint(_key(2), (3, 4), 0, V)
  right_tokens = jnp.concatenate([jnp.where(mask, tokens, garbage[:, :1]), garbage], axis=1)
  right_mask = jnp.concatenate([mask, jnp.zeros((3, 4), bool)], axis=1)
  left_tokens = jnp.concatenate([garbage, tokens], axis=1)
  left_mask = jnp.concatenate([jnp.zeros((3, 4), bool), mask], axis=1)
  right = apply(params, None, right_tokens, right_mask)
  left = apply(params, None, left_tokens, left_mask)
  np.testing.assert_allclose(right["pooled"], ref["pooled"], atol=1e-5)
  np.testing.assert_allclose(left["pooled"], ref["pooled"], atol=1e-5)
  np.testing.assert_allclose(right["tokens"][:, :6], ref["tokens"], atol=1e-5)


def test_bidirectional(encoder):
  apply, params, tokens, mask = encoder
  ref = apply(params, None, tokens, mask)
  changed = tokens.at[0, 5].set((tokens[0, 5] + 1) % V)
  out = apply(params, None, changed, mask)
  # A later token changes the first token's output; rows 1, 2 untouched.
  assert not np.allclose(out["tokens"][0, 0], ref["tokens"][0, 0])
  np.testing.assert_array_equal(out["pooled"][1:], ref["pooled"][1:])


def test_empty_row_is_zero(encoder):
  apply, params, tokens, mask = encoder
  out = apply(params, None, tokens, mask.at[2].set(False))
  chex.assert_tree_all_finite(out)
  np.testing.assert_array_equal(out["pooled"][2], 0.0)


def test_bad_inputs_raise():
  tokens = jnp.zeros((1, MAX_LEN + 1), jnp.int32)
  with pytest.raises(ValueError, match="exceeds max_len"):
    jax.eval_shape(lambda t: _model().init(_key(0), t, t > 0), tokens)
  with pytest.raises(ValueError, match="not divisible"):
    jax.eval_shape(lambda t: _model(dim=30).init(_key(0), t, t > 0), tokens[:, :4])
  with pytest.raises(ValueError, match=r"\[B, T\]"):
    jax.eval_shape(lambda t: _model().init(_key(0), t, t[:, :2] > 0), tokens[:, :4])
