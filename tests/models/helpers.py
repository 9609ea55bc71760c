"""Shared test helpers for the model tests."""

import jax
import jax.numpy as jnp

from flamingo_jax.models import flamingo


def tiny_model(**overrides):
  """The tiny model with its apply functions jitted (eager Haiku applies are slow)."""
  cfg = flamingo.model_config("tiny")
  with cfg.unlocked():
    for k, v in overrides.items():
      cfg[k] = v
  return jit_model(flamingo.make_model(cfg))


def jit_model(model):
  return model._replace(
    init=jax.jit(model.init),
    forward=jax.jit(model.forward, static_argnames="is_training"),
    encode_media=jax.jit(model.encode_media),
    lm_forward=jax.jit(model.lm_forward, static_argnums=(7,), static_argnames="lm_only"),
    vision_features=jax.jit(model.vision_features),
  )


def open_gates(params, rng, scale=1.0):
  """Copy of params with random non-zero xattn gates (init has them at 0)."""
  params = dict(params)
  block = dict(params["lm/gated_xattn"])
  k1, k2 = jax.random.split(rng)
  block["attn_gate"] = scale * jax.random.normal(k1, block["attn_gate"].shape) + 1.0
  block["ffw_gate"] = scale * jax.random.normal(k2, block["ffw_gate"].shape) + 1.0
  params["lm/gated_xattn"] = block
  return params


def images_and_tokens(model, batch=2, num_media=3, frames=1, seq=12, seed=0):
  c = model.configs
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  images = jax.random.uniform(k1, (batch, num_media, frames, 32, 32, 3))
  tokens = jax.random.randint(k2, (batch, seq), 0, c.lm.vocab_size)
  return images, tokens


def place_images(tokens, image_id, positions):
  """Put `<image>` markers at `positions` (list per batch row)."""
  for b, pos in enumerate(positions):
    tokens = tokens.at[b, jnp.asarray(pos)].set(image_id)
  return tokens


def tiny_eval_model(vocab_size: int, image_size: int, resampler_kind: str = "perceiver"):
  """(model, params at init) of a 2-layer tiny Flamingo over `vocab_size` (+2 extra) ids, as the
  evaluation tests use it."""
  cfg = flamingo.model_config("tiny")
  with cfg.unlocked():
    cfg.lm.vocab_size = vocab_size - 2
    cfg.lm.num_layers, cfg.xattn.every = 2, 2
    cfg.resampler.kind = resampler_kind
  model = flamingo.make_model(cfg)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0), jnp.zeros((1, 1, 1, image_size, image_size, 3)), jnp.zeros((1, 4), jnp.int32)
  )
  return model, params
