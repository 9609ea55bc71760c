"""Tests for the NFNet vision encoder."""

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import nfnet


def _forward(variant="test", **kwargs):
  def f(images, is_training):
    return nfnet.NFNet(variant, **kwargs)(images, is_training=is_training)

  return hk.transform(f)


def _key(seed):
  # RBG keys: XLA:CPU compiles threefry-based initialisation ~5x slower.
  return jax.random.key(seed, impl="rbg")


# Compile-time bound on CPU: cheaper XLA backend passes halve compile time
# (numerics are unchanged up to float reassociation).
_jit = functools.partial(
  jax.jit, compiler_options={"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
)


def _images(batch=2, size=64, seed=0):
  return jax.random.uniform(_key(seed), (batch, size, size, 3))


def _num_params(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))


@pytest.fixture(scope="module")
def tiny():
  """The 'test' variant: params (one init for the whole file) and outputs."""
  model = _forward()
  images = _images()

  @_jit
  def init_and_apply(rng, images):  # One compilation for both.
    params = model.init(rng, images, False)
    return params, model.apply(params, None, images, False)

  params, out = init_and_apply(_key(0), images)
  return params, images, out


def test_output_shapes_and_paths(tiny):
  params, _, out = tiny
  dv = nfnet.output_dim("test")
  assert dv == 2 * nfnet.NFNET_VARIANTS["test"]["width"][-1] == 64
  chex.assert_shape(out["grid"], (2, 2, 2, dv))  # 64 px / 32.
  chex.assert_shape(out["pooled"], (2, dv))
  chex.assert_trees_all_close(out["pooled"], out["grid"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
  chex.assert_tree_all_finite(out)
  assert all(k.startswith("vision_encoder/") for k in params)
  assert "vision_encoder/final_conv" in params
  assert set(params["vision_encoder/block_0/conv0"]) == {"w", "gain", "bias"}
  assert "vision_encoder/block_0/squeeze_excite/fc0" in params
  # Transition blocks (channel change or stride) have a shortcut conv.
  for i in range(4):
    assert f"vision_encoder/block_{i}/conv_shortcut" in params
  # skip_gain starts at 0 in every block.
  gains = [v["skip_gain"] for v in params.values() if "skip_gain" in v]
  assert len(gains) == 4 and all(g == 0.0 for g in gains)


def test_bf16_compute_keeps_fp32_params(tiny):
  params, images, ref = tiny
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  out = _jit(_forward(dtype=jnp.bfloat16).apply, static_argnums=3)(params, None, images, False)
  assert out["grid"].dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out["pooled"], np.float32), ref["pooled"], atol=0.1, rtol=0.1)


def test_weight_standardisation():
  w = 3.0 + 2.0 * jax.random.normal(_key(1), (3, 3, 4, 5))
  gain = jnp.arange(1.0, 6.0)
  ws = nfnet.standardize_weight(w, jnp.ones((5,)))
  fan_in = 3 * 3 * 4
  np.testing.assert_allclose(ws.mean(axis=(0, 1, 2)), 0.0, atol=1e-6)
  np.testing.assert_allclose(ws.var(axis=(0, 1, 2)) * fan_in, 1.0, rtol=1e-4)
  np.testing.assert_allclose(nfnet.standardize_weight(w, gain), ws * gain, rtol=1e-5, atol=1e-6)
  # Done in fp32 even for bf16 weights.
  assert nfnet.standardize_weight(w.astype(jnp.bfloat16), gain).dtype == jnp.float32

  # The conv uses the standardised kernel.
  conv = hk.transform(lambda x: nfnet.WSConv2D(5, 3, name="conv")(x))
  x = jax.random.normal(_key(2), (1, 6, 6, 4))
  params = {"conv": {"w": w, "gain": gain, "bias": jnp.full((5,), 0.5)}}
  chex.assert_trees_all_equal_shapes(jax.eval_shape(lambda x: conv.init(_key(3), x), x), params)
  p = params["conv"]
  expected = (
    jax.lax.conv_general_dilated(
      x,
      nfnet.standardize_weight(p["w"], p["gain"]),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    + p["bias"]
  )
  np.testing.assert_allclose(conv.apply(params, None, x), expected, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def blocks():
  """An identity block (stochastic depth 0.5) and a transition block."""

  def f(x, is_training):
    kw = dict(beta=0.7, alpha=0.2, group_width=4)
    ident = nfnet.NFBlock(16, 16, stride=1, stochdepth_rate=0.5, name="ident", **kw)
    trans = nfnet.NFBlock(16, 32, stride=2, name="trans", **kw)
    return {"ident": ident(x, is_training), "trans": trans(x, is_training)}

  model = hk.transform(f)
  x = jax.random.normal(_key(0), (16, 4, 4, 16))
  params = _jit(model.init, static_argnums=2)(_key(1), x, False)
  return _jit(model.apply, static_argnums=3), params, x


def test_skip_gain_zero_init_gives_shortcut(blocks):
  apply, params, x = blocks
  assert params["ident"]["skip_gain"] == 0.0
  assert params["trans"]["skip_gain"] == 0.0
  out = apply(params, None, x, False)
  # Identity block: exactly the input.
  np.testing.assert_array_equal(out["ident"], x)
  # Transition block: exactly the (pooled, projected) shortcut.
  sc = params["trans/conv_shortcut"]
  pooled = hk.without_apply_rng(
    hk.transform(lambda y: hk.avg_pool(y, (1, 2, 2, 1), (1, 2, 2, 1), "SAME"))
  ).apply({}, nfnet.scaled_gelu(x) * 0.7)
  expected = (
    jax.lax.conv_general_dilated(
      pooled,
      nfnet.standardize_weight(sc["w"], sc["gain"]),
      (1, 1),
      "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
    )
    + sc["bias"]
  )
  np.testing.assert_allclose(out["trans"], expected, rtol=1e-5, atol=1e-5)


def test_stochastic_depth_train_only_and_deterministic(blocks):
  apply, params, x = blocks
  params = {k: ({**v, "skip_gain": jnp.ones(())} if "skip_gain" in v else v) for k, v in params.items()}
  # Eval: no rng needed, nothing random, nothing dropped.
  ev = apply(params, None, x, False)["ident"]
  np.testing.assert_array_equal(ev, apply(params, _key(5), x, False)["ident"])
  assert not np.allclose(ev, x)
  # Train: deterministic given the rng; each example keeps its whole residual
  # (= eval output) or drops it (= the identity shortcut).
  rng = _key(1)
  tr = apply(params, rng, x, True)["ident"]
  np.testing.assert_array_equal(tr, apply(params, rng, x, True)["ident"])
  kept_masks = []
  for seed in range(1, 4):
    out = np.asarray(apply(params, _key(seed), x, True)["ident"])
    kept = np.array([np.allclose(o, e) for o, e in zip(out, ev)])
    dropped = np.array([np.array_equal(o, i) for o, i in zip(out, x)])
    np.testing.assert_array_equal(kept, ~dropped)
    kept_masks.append(kept)
  kept_masks = np.stack(kept_masks)
  assert kept_masks.any() and not kept_masks.all()
  assert len({m.tobytes() for m in kept_masks}) > 1  # Depends on the rng.


def test_stochastic_depth_drops_whole_examples():
  x = jnp.ones((64, 2, 2, 3))
  out = nfnet.stochastic_depth(_key(0), x, 0.5)
  per_example = np.asarray(out).reshape(64, -1)
  assert set(np.unique(per_example.min(1))) <= {0.0, 1.0}
  np.testing.assert_array_equal(per_example.min(1), per_example.max(1))
  assert 0 < per_example[:, 0].sum() < 64


def test_variant_table():
  unit = np.array([1, 2, 6, 3])
  keys = {"width", "depth", "train_imsize", "test_imsize", "drop_rate", "group_width", "stem_width"}
  for n in range(7):
    cfg = nfnet.NFNET_VARIANTS[f"F{n}"]
    assert set(cfg) == keys
    assert cfg["width"] == [256, 512, 1536, 1536]
    assert cfg["depth"] == list((n + 1) * unit)
    assert cfg["group_width"] == 128
    assert cfg["train_imsize"] < cfg["test_imsize"]
    assert nfnet.output_dim(f"F{n}") == 3072
  assert nfnet.NFNET_VARIANTS["F6"]["depth"] == [7, 14, 42, 21]
  assert set(nfnet.NFNET_VARIANTS["test"]) == keys
  with pytest.raises(ValueError, match="Unknown NFNet variant"):
    nfnet.output_dim("F9")


def test_block_schedule():
  alpha = 0.2
  schedule = nfnet.block_schedule("F1", alpha=alpha, stochdepth_rate=0.1)
  depths = [2, 4, 12, 6]
  assert len(schedule) == sum(depths)
  # The expected variance of a block's input grows by alpha^2 per block and
  # restarts at 1 after each stage's transition block (whose shortcut is a
  # fresh projection); beta = 1 / expected std.
  start = 0
  for stage, depth in enumerate(depths):
    blocks = schedule[start : start + depth]
    assert all(b["stage"] == stage for b in blocks)
    first = 1.0 if stage == 0 else 1.0 / np.sqrt(1 + depths[stage - 1] * alpha**2)
    expected = [first] + [1.0 / np.sqrt(1 + k * alpha**2) for k in range(1, depth)]
    np.testing.assert_allclose([b["beta"] for b in blocks], expected, rtol=1e-6)
    assert blocks[0]["stride"] == (1 if stage == 0 else 2)
    assert all(b["stride"] == 1 for b in blocks[1:])
    start += depth
  np.testing.assert_allclose([b["stochdepth_rate"] for b in schedule], 0.1 * np.arange(24) / 24)
  assert schedule[0]["in_ch"] == 128 and schedule[-1]["out_ch"] == 1536


def test_f6_parameter_count():
  model = _forward("F6")
  shapes = jax.eval_shape(
    lambda x: model.init(_key(0), x, False), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  )
  count = _num_params(shapes)
  # Flamingo Table 4: 435M (NFNet paper: 438.4M incl. a 3072x1000 head).
  assert abs(count - 435e6) / 435e6 < 0.02, count
  assert abs(count + 3072 * 1000 + 1000 - 438.4e6) / 438.4e6 < 0.001, count


def test_bad_images_raise():
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    _forward().init(_key(0), jnp.zeros((2, 32, 32)), False)
