"""Tests for the stage-1 contrastive model and loss."""

import functools
import math

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flamingo_jax.models import contrastive, nfnet

B, E, T = 4, 16, 5


def _key(seed):
  # RBG keys: XLA:CPU compiles threefry-based initialisation ~5x slower.
  return jax.random.key(seed, impl="rbg")


# Compile-time bound on CPU: cheaper XLA backend passes halve compile time
# (numerics are unchanged up to float reassociation).
_jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


def _config():
  return ml_collections.ConfigDict(
    {
      "vision_variant": "test",
      "embed_dim": E,
      "text": {"vocab_size": 40, "dim": 32, "num_layers": 2, "num_heads": 4, "max_len": 8},
    }
  )


# Jitted: one compilation per shape instead of one per primitive.
_loss = _jit(contrastive.contrastive_loss, static_argnames=("label_smoothing", "terms"))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _inputs():
  images = jax.random.uniform(_key(0), (B, 32, 32, 3))
  tokens = jax.random.randint(_key(1), (B, T), 1, 40)
  mask = jnp.arange(T)[None, :] < jnp.array([[5], [3], [1], [4]])
  return images, tokens, mask


def _loss_and_grads(is_training, train_vision):
  """init, forward and loss gradient, as one jitted function of an rng."""
  model = contrastive.make_contrastive_model(_config())
  images, tokens, mask = _inputs()

  @_jit
  def run(rng):
    params = model.init(rng, images, tokens, mask, False)
    # Differentiating through the NFNet triples the compile time on CPU, so
    # the fast test keeps it fixed (test_full_gradient_with_stochastic_depth
    # covers it).
    trainable, frozen = hk.data_structures.partition(
      lambda m, n, v: train_vision or not m.startswith("vision_encoder"), params
    )

    def loss_fn(trainable):
      p = hk.data_structures.merge(trainable, frozen)
      out = model.apply(p, rng, images, tokens, mask, is_training)
      loss, _ = contrastive.contrastive_loss(out["image_embed"], out["text_embed"], out["logit_scale"])
      return loss, out

    (loss, out), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    return params, out, loss, grads

  return run(_key(2))


@pytest.fixture(scope="module")
def trained_once():
  return _loss_and_grads(is_training=False, train_vision=False)


def test_outputs_and_param_paths(trained_once):
  params, out, loss, _ = trained_once
  chex.assert_shape([out["image_embed"], out["text_embed"]], (B, E))
  chex.assert_shape(out["logit_scale"], ())
  for key in ("image_embed", "text_embed"):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(out["logit_scale"], math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(params["contrastive"]["logit_scale"], math.log(10.0), rtol=1e-6)
  assert np.isfinite(loss)
  tops = {k.split("/")[0] for k in params}
  assert tops == {"vision_encoder", "text_encoder", "contrastive"}
  assert set(params["contrastive"]) == {"logit_scale"}
  chex.assert_shape(params["contrastive/image_proj"]["w"], (nfnet.output_dim("test"), E))
  chex.assert_shape(params["contrastive/text_proj"]["w"], (32, E))
  assert set(k for k in params if k.startswith("contrastive")) == {
    "contrastive",
    "contrastive/image_proj",
    "contrastive/text_proj",
  }
  assert "vision_encoder/final_conv" in params
  assert "text_encoder/layers/block" in params


def test_gradients_finite(trained_once):
  params, _, _, grads = trained_once
  assert set(grads) == {k for k in params if not k.startswith("vision_encoder")}
  chex.assert_tree_all_finite(grads)
  assert float(jnp.abs(grads["contrastive"]["logit_scale"])) > 0
  for k in ("contrastive/text_proj", "contrastive/image_proj", "text_encoder/token_embed"):
    assert float(jnp.abs(jax.tree_util.tree_leaves(grads[k])[0]).sum()) > 0


@pytest.mark.slow
def test_full_gradient_with_stochastic_depth():
  params, out, loss, grads = _loss_and_grads(is_training=True, train_vision=True)
  chex.assert_trees_all_equal_structs(params, grads)
  chex.assert_tree_all_finite((out, loss, grads))
  # skip_gain = 0 at init: the residual branches get no gradient yet except
  # through skip_gain itself.
  gains = [v["skip_gain"] for k, v in grads.items() if "skip_gain" in v]
  assert gains and any(float(jnp.abs(g)) > 0 for g in gains)


def _numpy_loss(img, txt, logit_scale, eps):
  logits = np.exp(logit_scale) * img @ txt.T
  n = len(img)
  targets = (1 - eps) * np.eye(n) + eps / n

  def xent(lg):
    lg = lg - lg.max(axis=1, keepdims=True)
    logp = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return float(np.mean(-(targets * logp).sum(axis=1)))

  return 0.5 * (xent(logits) + xent(logits.T))


def test_loss_matches_numpy():
  rng = np.random.default_rng(0)
  img = _unit(rng.normal(size=(3, 4))).astype(np.float32)
  txt = _unit(rng.normal(size=(3, 4))).astype(np.float32)
  scale = np.float32(math.log(5.0))
  loss, metrics = _loss(jnp.asarray(img), jnp.asarray(txt), jnp.asarray(scale))
  expected = _numpy_loss(img.astype(np.float64), txt.astype(np.float64), float(scale), 0.1)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], loss)
  np.testing.assert_allclose(metrics["inverse_temperature"], 5.0, rtol=1e-6)
  # Same as optax's smoothed cross-entropy in both directions.
  logits = 5.0 * img @ txt.T
  labels = optax.smooth_labels(jnp.eye(3), 0.1)
  np.testing.assert_allclose(
    metrics["i2t_loss"], optax.softmax_cross_entropy(logits, labels).mean(), rtol=1e-5
  )
  np.testing.assert_allclose(
    metrics["t2i_loss"], optax.softmax_cross_entropy(logits.T, labels).mean(), rtol=1e-5
  )
  # The paper's Eq. 3 sums the two terms.
  summed, _ = _loss(img, txt, scale, terms="sum")
  np.testing.assert_allclose(summed, 2 * loss, rtol=1e-6)
  # Without smoothing it is the plain cross-entropy.
  loss0, _ = _loss(img, txt, scale, label_smoothing=0.0)
  np.testing.assert_allclose(loss0, _numpy_loss(img, txt, float(scale), 0.0), rtol=1e-5)


def test_aligned_beats_random():
  rng = np.random.default_rng(1)
  img = _unit(rng.normal(size=(8, 16))).astype(np.float32)
  aligned = img + 0.01 * rng.normal(size=img.shape).astype(np.float32)
  random = _unit(rng.normal(size=(8, 16))).astype(np.float32)
  scale = jnp.float32(math.log(10.0))
  loss_a, m_a = _loss(img, _unit(aligned), scale)
  loss_r, m_r = _loss(img, random, scale)
  assert loss_a < loss_r
  assert m_a["i2t_accuracy"] == 1.0 and m_a["t2i_accuracy"] == 1.0
  assert m_r["i2t_accuracy"] < 1.0 and m_r["t2i_accuracy"] < 1.0


def test_masked_examples_do_not_matter():
  rng = np.random.default_rng(2)
  img = _unit(rng.normal(size=(6, 8))).astype(np.float32)
  txt = _unit(img + 0.5 * rng.normal(size=img.shape)).astype(np.float32)
  valid = np.array([True, True, False, True, False, True])
  scale = jnp.float32(math.log(10.0))
  loss_sub, m_sub = _loss(img[valid], txt[valid], scale)
  # Padding rows are garbage (here: copies of a valid example's partner,
  # which would be a hard negative if they counted).
  img_pad, txt_pad = img.copy(), txt.copy()
  img_pad[~valid] = img[0]
  txt_pad[~valid] = txt[0]
  loss, m = _loss(img_pad, txt_pad, scale, jnp.asarray(valid))
  np.testing.assert_allclose(loss, loss_sub, rtol=1e-6)
  for k in ("i2t_loss", "t2i_loss", "i2t_accuracy", "t2i_accuracy"):
    np.testing.assert_allclose(m[k], m_sub[k], rtol=1e-6)
  assert m["num_valid"] == 4
  # Gradients are finite and zero on padded examples.
  grads = _jit(jax.grad(lambda i, t, s: contrastive.contrastive_loss(i, t, s, valid)[0], argnums=(0, 1, 2)))(
    jnp.asarray(img_pad), jnp.asarray(txt_pad), scale
  )
  chex.assert_tree_all_finite(grads)
  np.testing.assert_array_equal(grads[0][~valid], 0.0)
  np.testing.assert_array_equal(grads[1][~valid], 0.0)
  # No valid example at all: zero loss, finite gradients.
  none = jnp.zeros((6,), bool)
  loss_none, _ = _loss(img, txt, scale, none)
  assert loss_none == 0.0
  chex.assert_tree_all_finite(
    _jit(jax.grad(lambda s: contrastive.contrastive_loss(img, txt, s, none)[0]))(scale)
  )


def test_bf16_embeddings_computed_in_fp32():
  rng = np.random.default_rng(3)
  img = jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.bfloat16)
  txt = jnp.asarray(_unit(rng.normal(size=(4, 8))), jnp.bfloat16)
  loss, metrics = _loss(img, txt, jnp.float32(2.3))
  assert loss.dtype == jnp.float32
  assert all(v.dtype == jnp.float32 for v in metrics.values())


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match=r"\[B, E\]"):
    _loss(jnp.zeros((3, 4)), jnp.zeros((2, 4)), 0.0)
  with pytest.raises(ValueError, match="valid has shape"):
    _loss(jnp.zeros((3, 4)), jnp.zeros((3, 4)), 0.0, jnp.ones((2,), bool))
