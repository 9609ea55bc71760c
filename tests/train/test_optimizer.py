"""The optimiser from a config's `optim` section: schedule and per-parameter step multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import common
from flamingo_jax.train import optimizer as optimizer_lib


def _params():
  return {
    "lm/gated_xattn": {"attn_gate": jnp.zeros([2]), "q": jnp.ones([2, 3])},
    "perceiver_resampler": {"latents": jnp.ones([4, 3])},
  }


def _updates(**optim):
  cfg = ml_collections.ConfigDict(common.optim(lr=1e-2, warmup_steps=0, **optim))
  params = _params()
  opt = optimizer_lib.make_optimizer(cfg, params)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, _ = opt.update(grads, opt.init(params), params)
  return updates


def test_lr_multipliers_scale_only_the_matching_params():
  plain = _updates()
  scaled = _updates(lr_multipliers=[(r"_gate$", 30.0), (r"^perceiver_resampler/", 0.5)])
  np.testing.assert_allclose(
    scaled["lm/gated_xattn"]["attn_gate"], 30.0 * plain["lm/gated_xattn"]["attn_gate"], rtol=1e-6
  )
  np.testing.assert_allclose(
    scaled["perceiver_resampler"]["latents"], 0.5 * plain["perceiver_resampler"]["latents"], rtol=1e-6
  )
  np.testing.assert_array_equal(scaled["lm/gated_xattn"]["q"], plain["lm/gated_xattn"]["q"])


def test_lr_multiplier_matching_nothing_is_an_error():
  with pytest.raises(ValueError, match="matches no trainable parameter"):
    _updates(lr_multipliers=[(r"^no_such_module/", 2.0)])


@pytest.mark.parametrize("decay", ["constant", "cosine", "linear"])
def test_learning_rate_schedule_warms_up_then_holds_or_decays_to_zero(decay):
  cfg = ml_collections.ConfigDict(common.optim(lr=1e-3, warmup_steps=10, total_steps=110, decay=decay))
  schedule = optimizer_lib.learning_rate_schedule(cfg)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  if decay == "constant":
    np.testing.assert_allclose([schedule(60), schedule(110)], [1e-3, 1e-3], rtol=1e-6)
  else:  # cosine and linear both pass half the rate half-way
    np.testing.assert_allclose([schedule(60), schedule(110)], [5e-4, 0.0], rtol=1e-5, atol=1e-9)
  if decay == "linear":
    np.testing.assert_allclose(schedule(35), 7.5e-4, rtol=1e-5)


def test_unknown_decay_or_kind_is_an_error():
  with pytest.raises(ValueError, match="optim.decay"):
    _updates(decay="exponential")
  with pytest.raises(ValueError, match="optim.kind"):
    _updates(kind="sgd")


def test_adam_puts_weight_decay_in_the_gradient_and_adamw_beside_it():
  """Adam (the paper's stage 1): the L2 term passes through Adam's normalisation, so with no
  gradient a decayed param moves by ~lr (sign of the param); AdamW moves it by lr * wd * param."""
  zero = dict(lr=1e-2, weight_decay=0.1)
  params = _params()
  for kind in ("adam", "adamw"):
    cfg = ml_collections.ConfigDict(common.optim(warmup_steps=0, kind=kind, **zero))
    opt = optimizer_lib.make_optimizer(cfg, params)
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    q = updates["lm/gated_xattn"]["q"]
    want = -1e-2 if kind == "adam" else -1e-2 * 0.1
    np.testing.assert_allclose(q, want * np.ones_like(q), rtol=1e-4)
    np.testing.assert_array_equal(updates["perceiver_resampler"]["latents"], 0.0)


def test_the_global_norm_clip_can_be_scoped_to_some_params():
  """Stage 1 clips the text encoder's gradient by its own norm; the other params are not touched."""
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 3.0), params)
  for scope, clipped_module in (((".*",), None), ((r"^perceiver_resampler/",), "perceiver_resampler")):
    cfg = ml_collections.ConfigDict(common.optim(grad_clip_norm=0.1, grad_clip_on=scope))
    clip = optax.chain(*optimizer_lib.clipping(cfg, params))
    out, _ = clip.update(grads, clip.init(params), params)
    if clipped_module is None:
      np.testing.assert_allclose(optax.global_norm(out), 0.1, rtol=1e-5)
    else:
      np.testing.assert_allclose(optax.global_norm(out[clipped_module]), 0.1, rtol=1e-5)
      np.testing.assert_array_equal(out["lm/gated_xattn"]["q"], grads["lm/gated_xattn"]["q"])


def test_agc_acts_on_its_own_params_only():
  """AGC (stage 1: the NFNet's) clips each matching param's gradient unit-wise to agc_clip x its norm;
  the others pass unchanged."""
  params = _params()
  grads = jax.tree.map(lambda p: jnp.full_like(p, 100.0), params)
  cfg = ml_collections.ConfigDict(
    common.optim(grad_clip_norm=0.0, agc_clip=0.01, agc_on=(r"^perceiver_resampler/",))
  )
  clip = optax.chain(*optimizer_lib.clipping(cfg, params))
  out, _ = clip.update(grads, clip.init(params), params)
  latents = np.asarray(out["perceiver_resampler"]["latents"])
  assert np.all(np.abs(latents) < 1.0)  # clipped far below 100 (params are ones)
  np.testing.assert_array_equal(out["lm/gated_xattn"]["q"], grads["lm/gated_xattn"]["q"])
