"""Acceptance tests of the assembled model: init == LM, phi causality, KV cache, video frames."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo, gated_xattn, masking
from tests.models import helpers

IMAGE_POSITIONS = [[2, 6, 9], [0, 4, 8]]


@pytest.fixture(scope="module")
def setup():
  model = helpers.tiny_model()
  images, tokens = helpers.images_and_tokens(model)
  image_id = model.configs.lm.vocab_size
  tokens = helpers.place_images(tokens, image_id, IMAGE_POSITIONS)
  params = model.init(jax.random.PRNGKey(0), images, tokens)
  media_index = masking.media_index_from_tokens(tokens, image_id)
  return model, params, images, tokens, media_index


def test_init_equals_frozen_lm_for_any_images(setup):
  model, params, images, tokens, media_index = setup
  lm_logits, _ = model.lm_forward(params, None, tokens, lm_only=True)
  for seed in range(3):
    other = jax.random.uniform(jax.random.PRNGKey(seed + 10), images.shape)
    logits = model.forward(params, None, other, tokens, media_index)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(lm_logits))


def test_changing_image_j_leaves_earlier_positions_unchanged(setup):
  model, params, images, tokens, media_index = setup
  params = helpers.open_gates(params, jax.random.PRNGKey(1))
  base = model.forward(params, None, images, tokens, media_index)
  for j in range(images.shape[1]):
    changed = images.at[:, j].set(jax.random.uniform(jax.random.PRNGKey(j), images.shape[2:]))
    out = model.forward(params, None, changed, tokens, media_index)
    for b, positions in enumerate(IMAGE_POSITIONS):
      marker = positions[j]
      np.testing.assert_allclose(out[b, :marker], base[b, :marker], atol=1e-6)
      # From the marker on the logits do depend on image j (the gates are open).
      assert np.abs(np.asarray(out[b, marker:] - base[b, marker:])).max() > 1e-4


def test_tokens_before_first_image_unaffected_by_all_images(setup):
  model, params, images, tokens, media_index = setup
  params = helpers.open_gates(params, jax.random.PRNGKey(2))
  base = model.forward(params, None, images, tokens, media_index)
  other = model.forward(params, None, 1.0 - images, tokens, media_index)
  np.testing.assert_array_equal(np.asarray(base[0, :2]), np.asarray(other[0, :2]))


def test_cached_prefill_and_decode_match_full_forward(setup):
  model, params, images, tokens, media_index = setup
  params = helpers.open_gates(params, jax.random.PRNGKey(3))
  full = model.forward(params, None, images, tokens, media_index)
  visual = model.encode_media(params, None, images)
  prompt = 10  # all three images are in the prompt
  cache = model.init_cache(tokens.shape[0], 16, images.shape[1])
  logits, cache = model.lm_forward(
    params, None, tokens[:, :prompt], visual, media_index[:, :prompt], None, cache
  )
  steps = [logits]
  for t in range(prompt, tokens.shape[1]):
    step, cache = model.lm_forward(params, None, tokens[:, t : t + 1], None, None, None, cache)
    steps.append(step)
  np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5)


@pytest.mark.parametrize("frames", [8, 30])
def test_video_frames_and_interpolated_temporal_embeddings(frames):
  model = helpers.tiny_model()  # tiny resampler has max_frames=4: 8 and 30 frames interpolate
  images, tokens = helpers.images_and_tokens(model, batch=1, num_media=1, frames=frames, seq=6)
  params = model.init(jax.random.PRNGKey(0), images, tokens)
  visual = model.encode_media(params, None, images)
  c = model.configs.resampler
  chex.assert_shape(visual, (1, 1, c.num_latents, c.dim))
  chex.assert_tree_all_finite(visual)


def test_encode_media_shapes_and_pooled_features(setup):
  model, params, images, *_ = setup
  pooled = model.vision_features(params, None, images[:, 0, 0])
  assert pooled.shape[0] == images.shape[0] and pooled.ndim == 2


@pytest.mark.parametrize(
  "size, layers, every, blocks",
  [("3b", 24, 1, 24), ("9b", 32, 4, 8), ("80b", 80, 7, 12)],
)
def test_xattn_block_counts_of_the_paper_sizes(size, layers, every, blocks):
  """Table 4 of the paper: xattn before every layer (3B), every 4th (9B), every 7th (80B), starting at
  layer 0. The 9B LM keeps 32 layers (docs/ARCHITECTURE.md, deviations: Table 5's 7.1B LM)."""
  cfg = flamingo.model_config(size)
  assert (cfg.lm.num_layers, cfg.xattn.every) == (layers, every)
  assert gated_xattn.num_xattn_blocks(cfg.lm.num_layers, cfg.xattn.every) == blocks


def test_a_clip_vit_fills_the_vision_encoder_role():
  model = helpers.tiny_model(vision_variant="ViT-test")  # 32 px, patch 8: a 4 x 4 grid of width 32
  images, tokens = helpers.images_and_tokens(model)
  params = model.init(jax.random.PRNGKey(0), images, tokens)
  assert params["vision_encoder/patch_embed"]["w"].shape == (8, 8, 3, 32)
  visual = model.encode_media(params, None, images)
  assert visual.shape == images.shape[:2] + (model.configs.resampler.num_latents, model.configs.resampler.dim)
  assert model.vision_features(params, None, images[:, 0, 0]).shape == (images.shape[0], 24)
  image_id = model.configs.lm.vocab_size
  tokens = helpers.place_images(tokens, image_id, IMAGE_POSITIONS)
  media_index = masking.media_index_from_tokens(tokens, image_id)
  logits = model.forward(params, None, images, tokens, media_index)  # at init: the frozen LM
  lm_logits, _ = model.lm_forward(params, None, tokens, lm_only=True)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(lm_logits))


def test_fused_attention_gives_the_einsum_models_logits(setup):
  """`lm.attention` / `xattn.attention = 'fused'` (jax.nn.dot_product_attention): the same logits,
  with padding, open gates and tokens before the first image, and the same KV-cache decoding."""
  model, params, images, tokens, media_index = setup
  params = helpers.open_gates(params, jax.random.PRNGKey(7))
  cfg = flamingo.model_config("tiny")
  with cfg.unlocked():
    cfg.lm.attention = cfg.xattn.attention = "fused"
  fused = helpers.jit_model(flamingo.make_model(cfg))
  mask = jnp.ones(tokens.shape, bool).at[1, -3:].set(False)
  want = model.forward(params, None, images, tokens, media_index, mask)
  got = fused.forward(params, None, images, tokens, media_index, mask)
  np.testing.assert_allclose(np.asarray(got)[np.asarray(mask)], np.asarray(want)[np.asarray(mask)], atol=2e-5)
  visual = model.encode_media(params, None, images)
  outs = []
  for m in (model, fused):
    cache = m.init_cache(tokens.shape[0], tokens.shape[1] + 1, images.shape[1])
    _, cache = m.prefill(params, tokens, cache, visual=visual, media_index=media_index)
    outs.append(m.decode_step(params, tokens[:, :1], cache)[0])
  np.testing.assert_allclose(np.asarray(outs[1]), np.asarray(outs[0]), atol=2e-5)
