"""Pins the parameter paths that freezing, sharding, conversion and checkpoints match on."""

import re

import jax

from configs import flamingo as flamingo_config
from flamingo_jax.summary import flat_paths
from tests.models import helpers

TOP_LEVEL = {
  "lm/embed",
  "lm/extra_embed",
  "lm/final_norm",
  "lm/gated_xattn",
  "lm/layers",
  "perceiver_resampler",
  "perceiver_resampler/final_norm",
  "perceiver_resampler/layers/layer",
  "perceiver_resampler/layers/layer/ffw_norm",
  "perceiver_resampler/layers/layer/latent_norm",
  "perceiver_resampler/layers/layer/media_norm",
}
LM_LAYER_PARAMS = {"attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down"}
XATTN_PARAMS = {
  "attn_gate",
  "ffw_gate",
  "attn_norm_scale",
  "attn_norm_bias",
  "q",
  "k",
  "v",
  "o",
  "ffw_norm_scale",
  "ffw_norm_bias",
  "ffw_in",
  "ffw_out",
}


def _params():
  model = helpers.tiny_model()
  images, tokens = helpers.images_and_tokens(model)
  return jax.eval_shape(model.init, jax.random.PRNGKey(0), images, tokens)


def test_module_paths_are_pinned():
  params = _params()
  non_vision = {k for k in params if not k.startswith("vision_encoder/")}
  assert non_vision == TOP_LEVEL
  assert any(k.startswith("vision_encoder/") for k in params)
  assert set(params["lm/layers"]) == LM_LAYER_PARAMS
  assert set(params["lm/gated_xattn"]) == XATTN_PARAMS


def test_layers_are_stacked():
  params = _params()
  model = helpers.tiny_model()
  n_layers = model.configs.lm.num_layers
  for name, leaf in params["lm/layers"].items():
    assert leaf.shape[0] == n_layers, name
  assert params["lm/gated_xattn"]["attn_gate"].shape == (3,)  # ceil(5 / 2)


def test_trainable_rules_claim_exactly_the_paper_parts():
  paths = flat_paths(_params())
  trainable = [p for p in paths if any(re.search(r, p) for r in flamingo_config.TRAINABLE)]
  assert all(p.startswith(("perceiver_resampler", "lm/gated_xattn", "lm/extra_")) for p in trainable)
  assert "lm/embed/embeddings" not in trainable
  assert "lm/extra_embed/embeddings" in trainable
  assert not any(p.startswith("vision_encoder") for p in trainable)
