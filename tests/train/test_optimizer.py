"""The optimiser from a config's `optim` section: schedule and per-parameter step multipliers."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
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


@pytest.mark.parametrize("decay", ["constant", "cosine"])
def test_learning_rate_schedule_warms_up_then_holds_or_decays_to_zero(decay):
  cfg = ml_collections.ConfigDict(common.optim(lr=1e-3, warmup_steps=10, total_steps=110, decay=decay))
  schedule = optimizer_lib.learning_rate_schedule(cfg)
  np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
  if decay == "constant":
    np.testing.assert_allclose([schedule(60), schedule(110)], [1e-3, 1e-3], rtol=1e-6)
  else:
    np.testing.assert_allclose([schedule(60), schedule(110)], [5e-4, 0.0], rtol=1e-5, atol=1e-9)


def test_unknown_decay_is_an_error():
  with pytest.raises(ValueError, match="optim.decay"):
    _updates(decay="linear")


def test_weight_decay_spares_exactly_the_perceiver_resampler():
  """The paper (App. B.1.2): decay 0.1 on every trained parameter except the Perceiver Resampler."""
  cfg = ml_collections.ConfigDict(common.optim(lr=1e-2, warmup_steps=0))
  params = _params()
  opt = optimizer_lib.make_optimizer(cfg, params)
  zero = jax.tree.map(jnp.zeros_like, params)  # no gradient: what moves is the decay alone
  updates, _ = opt.update(zero, opt.init(params), params)
  np.testing.assert_array_equal(updates["perceiver_resampler"]["latents"], 0.0)
  np.testing.assert_allclose(
    updates["lm/gated_xattn"]["q"], -1e-2 * 0.1 * params["lm/gated_xattn"]["q"], rtol=1e-6
  )
