"""Perceiver Resampler: shapes, temporal interpolation, per-item independence, no spatial positions."""

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import perceiver_resampler as resampler_lib

CFG = resampler_lib.ResamplerConfig(
  dim=24, depth=2, num_latents=4, num_heads=2, head_dim=12, ffw_mult=4, max_frames=4
)
B, N, LV, DV = 2, 3, 6, 10


def _model(cfg=CFG):
  return hk.without_apply_rng(hk.transform(lambda x: resampler_lib.PerceiverResampler(cfg)(x)))


def _random_params(features_shape, cfg=CFG, seed=0):
  """Random values for every parameter (from shapes only: the random initialisers compile slowly)."""
  shapes = jax.eval_shape(
    _model(cfg).init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct(features_shape, jnp.float32)
  )
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (rng.normal(size=s.shape) * 0.3).astype(np.float32), shapes)


@pytest.fixture(scope="module")
def setup():
  shape = (B, N, 2, LV, DV)
  params = _random_params(shape)
  apply = jax.jit(_model().apply)
  features = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  return params, apply, features


def test_output_shape_and_parameters(setup):
  params, apply, features = setup
  out = apply(params, features)
  chex.assert_shape(out, (B, N, CFG.num_latents, CFG.dim))
  chex.assert_tree_all_finite(out)
  top = params["perceiver_resampler"]
  chex.assert_shape(top["temporal_embed"], (CFG.max_frames, CFG.dim))
  chex.assert_shape(top["latents"], (CFG.num_latents, CFG.dim))
  chex.assert_shape(top["input_proj"], (DV, CFG.dim))
  chex.assert_shape(
    params["perceiver_resampler/layers/layer"]["q"], (CFG.depth, CFG.dim, CFG.num_heads * CFG.head_dim)
  )


def test_no_input_projection_when_widths_match():
  shapes = jax.eval_shape(
    _model().init, jax.random.PRNGKey(0), jax.ShapeDtypeStruct((1, 1, 1, LV, CFG.dim), jnp.float32)
  )
  assert "input_proj" not in shapes["perceiver_resampler"]
  out = jax.eval_shape(_model().apply, shapes, jax.ShapeDtypeStruct((1, 1, 1, LV, CFG.dim), jnp.float32))
  assert out.shape == (1, 1, CFG.num_latents, CFG.dim)


def test_interpolate_time_fewer_frames_takes_first_rows():
  table = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.testing.assert_array_equal(resampler_lib.interpolate_time(table, 1), table[:1])
  np.testing.assert_array_equal(resampler_lib.interpolate_time(table, 3), table[:3])
  np.testing.assert_array_equal(resampler_lib.interpolate_time(table, 4), table)


def test_interpolate_time_more_frames_keeps_ends_and_is_linear():
  table = np.array([[0.0, 1.0], [10.0, 1.0], [40.0, -1.0], [50.0, 3.0]], np.float32)
  got = np.asarray(jax.jit(resampler_lib.interpolate_time, static_argnums=1)(table, 7))
  # Frame f sits at 3 * f / 6 = f / 2 in table coordinates.
  want = np.array([[0, 1], [5, 1], [10, 1], [25, 0], [40, -1], [45, 1], [50, 3]], np.float32)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_array_equal(got[0], table[0])
  np.testing.assert_array_equal(got[-1], table[-1])


def test_media_items_are_processed_independently(setup):
  params, apply, features = setup
  base = np.asarray(apply(params, features))
  changed = features.copy()
  changed[:, 0] = np.random.default_rng(2).normal(size=changed[:, 0].shape)
  out = np.asarray(apply(params, changed))
  np.testing.assert_allclose(out[:, 1:], base[:, 1:], rtol=0, atol=1e-6)
  assert np.abs(out[:, 0] - base[:, 0]).max() > 1e-3
  # Across the batch too: sequence 1 does not see sequence 0's media.
  changed = features.copy()
  changed[0] += 1.0
  out = np.asarray(apply(params, changed))
  np.testing.assert_allclose(out[1], base[1], rtol=0, atol=1e-6)


def test_permuting_visual_tokens_within_a_frame_changes_nothing(setup):
  params, apply, features = setup
  base = apply(params, features)
  perm = np.random.default_rng(3).permutation(LV)
  np.testing.assert_allclose(apply(params, features[:, :, :, perm]), base, rtol=1e-5, atol=1e-5)
  # A different permutation per frame as well.
  shuffled = features.copy()
  shuffled[:, :, 1] = shuffled[:, :, 1, ::-1]
  np.testing.assert_allclose(apply(params, shuffled), base, rtol=1e-5, atol=1e-5)


def test_frame_order_matters_through_temporal_embeddings(setup):
  params, apply, features = setup
  base = apply(params, features)
  swapped = apply(params, features[:, :, ::-1])
  assert np.abs(np.asarray(swapped - base)).max() > 1e-3


@pytest.mark.parametrize("kind", ["mlp", "transformer"])
def test_the_ablation_kinds_keep_every_visual_token(kind):
  cfg = resampler_lib.ResamplerConfig(**{**CFG.__dict__, "kind": kind})
  shape = (B, N, 2, LV, DV)
  params = _random_params(shape, cfg)
  out = jax.jit(_model(cfg).apply)(params, np.random.default_rng(1).normal(size=shape).astype(np.float32))
  chex.assert_shape(out, (B, N, 2 * LV, CFG.dim))  # F*Lv tokens, not R latents
  chex.assert_tree_all_finite(out)
  assert all(path.startswith("perceiver_resampler") for path in params)  # the same freezing/lr rules
  assert "latents" not in params["perceiver_resampler"]
  assert ("q" in params["perceiver_resampler/layers/layer"]) == (kind == "transformer")
  with pytest.raises(ValueError, match="resampler.kind"):
    resampler_lib.ResamplerConfig(kind="cnn")
