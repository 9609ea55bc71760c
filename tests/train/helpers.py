"""Synthetic batches and a tiny Flamingo train set-up for the training tests."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import flamingo as flamingo_config
from flamingo_jax.models import flamingo, masking
from flamingo_jax.train import objectives, trainable
from flamingo_jax.train import state as state_lib


def synthetic_batch(model_cfg, batch=8, num_media=2, seq=10, seed=0, image_size=32):
  """A valid Flamingo batch: markers at fixed positions, phi from the tokens, last positions padded."""
  rng = np.random.default_rng(seed)
  vocab = model_cfg.lm.vocab_size
  tokens = rng.integers(0, vocab, size=(batch, seq)).astype(np.int32)
  tokens[:, 1] = vocab  # <image> markers
  tokens[:, 5] = vocab
  tokens[:, 7] = vocab + 1  # <EOC>
  token_mask = np.ones((batch, seq), bool)
  token_mask[::2, -2:] = False  # padding on every other row
  targets = np.concatenate([tokens[:, 1:], np.zeros((batch, 1), np.int32)], axis=1)
  loss_mask = (token_mask & np.roll(token_mask, -1, axis=1)).astype(np.float32)
  loss_mask[:, -1] = 0
  images = rng.uniform(size=(batch, num_media, 1, image_size, image_size, 3)).astype(np.float32)
  media_index = np.asarray(masking.media_index_from_tokens(jnp.asarray(tokens), vocab))
  return dict(
    images=images,
    media_mask=np.ones((batch, num_media), bool),
    tokens=tokens,
    targets=targets,
    loss_mask=loss_mask,
    media_index=media_index,
    token_mask=token_mask,
  )


def tiny_setup(optimizer=None, seed=0):
  """(objective, optimizer, state) for the tiny Flamingo with the paper's freeze rules."""
  cfg = flamingo.model_config("tiny")
  objective = objectives.flamingo_objective(cfg)
  batch = synthetic_batch(cfg)
  params = objective.init(jax.random.PRNGKey(seed), batch)
  train_p, frozen_p = trainable.split(params, flamingo_config.TRAINABLE, flamingo_config.FROZEN)
  optimizer = optimizer or optax.adamw(1e-2)
  state = state_lib.create(train_p, frozen_p, optimizer, jax.random.PRNGKey(seed + 1))
  return cfg, objective, optimizer, state
