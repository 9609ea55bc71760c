"""Unit tests of the pure building blocks in `flamingo_jax/models/layers.py` against numpy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import layers


def _attention(q, k, v, mask):
  return jax.jit(functools.partial(layers.attention, dtype=jnp.float32))(q, k, v, mask)


def _naive_attention(q, k, v, mask):
  """Numpy softmax attention; K/V heads repeated for grouped queries. Rows are assumed non-empty."""
  q, k, v, mask = (np.asarray(a, np.float64) for a in (q, k, v, mask))
  groups = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)  # head h uses kv head h // groups
  logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(mask[:, None].astype(bool), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum("bhts,bshd->bthd", probs, v)


def _random_qkv(hq, hkv, b=2, t=5, s=7, dh=8, dv=6, seed=0):
  rng = np.random.default_rng(seed)  # numpy: eager jax.random compiles slowly on this machine
  q = rng.normal(size=(b, t, hq, dh)).astype(np.float32)
  k = rng.normal(size=(b, s, hkv, dh)).astype(np.float32)
  v = rng.normal(size=(b, s, hkv, dv)).astype(np.float32)
  mask = rng.random((b, t, s)) < 0.6
  mask[:, :, 0] = True  # every row non-empty
  return q, k, v, mask


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (4, 1)])
def test_attention_matches_naive_softmax_attention(hq, hkv):
  q, k, v, mask = _random_qkv(hq, hkv)
  out = _attention(q, k, v, mask)
  chex.assert_shape(out, (2, 5, hq, 6))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _naive_attention(q, k, v, mask), atol=1e-5, rtol=1e-5)


def test_grouped_query_attention_equals_repeated_kv_heads():
  q, k, v, mask = _random_qkv(hq=4, hkv=2, seed=1)
  gqa = _attention(q, k, v, mask)
  mha = _attention(q, np.repeat(k, 2, axis=2), np.repeat(v, 2, axis=2), mask)
  np.testing.assert_allclose(gqa, mha, atol=1e-6, rtol=1e-6)


def test_fully_masked_row_is_exactly_zero_with_finite_gradients():
  q, k, v, mask = _random_qkv(hq=4, hkv=2, seed=2)
  mask[0, 1] = False  # one empty row
  mask[1] = False  # and a whole sequence without keys
  out = _attention(q, k, v, mask)
  np.testing.assert_array_equal(out[0, 1], 0.0)  # not the mean of the values
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.abs(np.asarray(out[0, 0])).max() > 0.0

  def loss(q, k, v):
    return jnp.sum(jnp.sin(layers.attention(q, k, v, mask, jnp.float32)))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  chex.assert_tree_all_finite(grads)
  dq, dk, dv = grads
  np.testing.assert_array_equal(dq[0, 1], 0.0)  # an empty row sends no gradient back
  np.testing.assert_array_equal(dq[1], 0.0)
  np.testing.assert_array_equal(dk[1], 0.0)
  np.testing.assert_array_equal(dv[1], 0.0)
  assert np.abs(np.asarray(dq[0, 0])).max() > 0.0


def test_attention_in_bfloat16_is_close_and_returns_fp32():
  q, k, v, mask = _random_qkv(hq=4, hkv=2, seed=3)
  out = jax.jit(functools.partial(layers.attention, dtype=jnp.bfloat16))(q, k, v, mask)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, _naive_attention(q, k, v, mask), atol=5e-2, rtol=5e-2)


def test_rms_norm_and_layer_norm_match_numpy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(3, 4, 16)).astype(np.float32) * 3 + 1
  scale = rng.normal(size=(16,)).astype(np.float32)
  bias = rng.normal(size=(16,)).astype(np.float32)
  eps = 1e-5
  want_rms = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale
  got_rms = jax.jit(layers.rms_norm, static_argnums=2)(x, scale, eps)
  assert got_rms.dtype == jnp.float32
  np.testing.assert_allclose(got_rms, want_rms, atol=1e-5, rtol=1e-5)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  want_ln = (x - mean) / np.sqrt(var + eps) * scale + bias
  got_ln = jax.jit(layers.layer_norm)(x, scale, bias)
  assert got_ln.dtype == jnp.float32
  np.testing.assert_allclose(got_ln, want_ln, atol=1e-5, rtol=1e-5)


def test_norms_compute_in_fp32_from_bf16_inputs():
  x = jnp.asarray(np.linspace(-3, 3, 32).reshape(2, 16), jnp.bfloat16)
  scale = jnp.ones((16,), jnp.bfloat16)
  rms, ln = jax.jit(lambda x, s: (layers.rms_norm(x, s, 1e-5), layers.layer_norm(x, s, 0 * s)))(x, scale)
  assert rms.dtype == ln.dtype == jnp.float32


def _rope(x, positions, theta=10000.0):
  cos, sin = layers.rope_angles(positions, x.shape[-1], theta)
  return layers.apply_rope(x, cos, sin)


def test_rope_preserves_norms_and_is_identity_at_position_zero():
  x = np.random.default_rng(0).normal(size=(2, 6, 3, 16)).astype(np.float32)
  positions = jnp.broadcast_to(jnp.arange(6) * 7, (2, 6))
  out = jax.jit(_rope)(x, positions)
  chex.assert_shape(out, x.shape)
  np.testing.assert_allclose(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(out[:, 0], x[:, 0], atol=1e-6)


def test_rope_dot_product_depends_only_on_position_difference():
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
  k = rng.normal(size=(1, 1, 1, 16)).astype(np.float32)
  rope = jax.jit(_rope)

  def score(m, n):
    return float(jnp.sum(rope(q, jnp.array([[m]])) * rope(k, jnp.array([[n]]))))

  for m, n in [(3, 1), (10, 2), (5, 5), (0, 4)]:
    base = score(m, n)
    for shift in (1, 17, 250):
      np.testing.assert_allclose(score(m + shift, n + shift), base, rtol=1e-4, atol=1e-4)
  assert abs(score(3, 1) - score(4, 1)) > 1e-3  # but it does depend on the difference


def test_rope_rotate_half_pairs_feature_i_with_i_plus_half():
  # A single non-zero feature i rotates into feature i + dh/2 (HF layout), never into i + 1.
  x = np.zeros((1, 1, 1, 8), np.float32)
  x[..., 1] = 1.0
  out = jax.jit(_rope, static_argnums=2)(x, np.array([[1]]), 1.0)
  nonzero = set(np.flatnonzero(np.abs(np.asarray(out)) > 1e-6).tolist())
  assert nonzero == {1, 5}


def test_positions_from_mask_with_left_padding_and_offset():
  mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]], bool)
  positions = jax.jit(layers.positions_from_mask)
  np.testing.assert_array_equal(positions(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]])
  offset = jnp.array([3, 0, 10])
  np.testing.assert_array_equal(
    positions(mask, offset), [[3, 3, 3, 4, 5], [0, 1, 2, 3, 4], [10, 10, 10, 10, 10]]
  )


def test_causal_mask():
  token_mask = jnp.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool)
  m = np.asarray(jax.jit(layers.causal_mask)(token_mask))
  chex.assert_shape(m, (2, 4, 4))
  np.testing.assert_array_equal(m[1], np.tril(np.ones((4, 4), bool)))
  want0 = np.tril(np.ones((4, 4), bool))
  want0[:, 0] = False  # the pad key is never visible
  np.testing.assert_array_equal(m[0], want0)


def test_bf16_matmul_accumulates_in_fp32():
  # 257 ones: the exact sum 257 is not representable in bf16 (256 or 258); fp32 accumulation keeps it.
  matmul = jax.jit(functools.partial(layers.matmul, dtype=jnp.bfloat16))
  out = matmul(np.ones((2, 257), np.float32), np.ones((257, 3), np.float32))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(out, 257.0)
  # Inputs are rounded to bf16 first (1 + 2^-9 becomes 1).
  out = matmul(np.full((1, 4), 1.0 + 2**-9, np.float32), np.ones((4, 1), np.float32))
  np.testing.assert_array_equal(out, 4.0)


@pytest.mark.parametrize(
  "spec,a_shape,b_shape",
  [("...i,io->...o", (2, 8, 24), (24, 32)), ("btkgd,bskd->bkgts", (2, 8, 2, 2, 16), (2, 16, 2, 16))],
)
def test_half_einsum_backward_takes_half_inputs_and_matches_jax(spec, a_shape, b_shape):
  """bf16: the gradients are JAX's own up to rounding the cotangent to bf16, in the operands' dtypes
  (fp32 activation, bf16 frozen weight), and every backward product takes bf16 x bf16 (JAX's own
  transpose takes the fp32 cotangent times a bf16 operand: an fp32 product after a convert)."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=a_shape).astype(np.float32)
  b = rng.normal(size=b_shape).astype(jnp.bfloat16)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
  ours = loss(lambda a, b: layers.einsum(spec, a, b, jnp.bfloat16))
  jaxs = loss(lambda a, b: jnp.einsum(spec, a.astype(jnp.bfloat16), b, preferred_element_type=jnp.float32))
  got, want = jax.grad(ours, (0, 1))(a, b), jax.grad(jaxs, (0, 1))(a, b)
  assert [g.dtype for g in got] == [jnp.float32, jnp.bfloat16]
  for g, w in zip(got, want):
    g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
    assert np.max(np.abs(g - w)) <= 2e-2 * np.max(np.abs(w))  # bf16 rounding of the cotangent
  jaxpr = jax.make_jaxpr(jax.grad(ours, (0, 1)))(a, b).jaxpr
  dots = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
  dots += [
    e
    for eqn in jaxpr.eqns
    for sub in eqn.params.values()
    if hasattr(sub, "jaxpr")
    for e in sub.jaxpr.eqns
    if e.primitive.name == "dot_general"
  ]
  assert len(dots) == 3
  assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
  # fp32 compute is JAX's own einsum, bit for bit.
  f32 = jax.grad(loss(lambda a, b: layers.einsum(spec, a, b, jnp.float32)), (0, 1))(a, b)
  ref = jax.grad(
    loss(lambda a, b: jnp.einsum(spec, a, b.astype(np.float32), preferred_element_type=jnp.float32)), (0, 1)
  )(a, b)
  chex.assert_trees_all_equal(f32, ref)


def test_thin_backward_products_take_fp32_inputs():
  """A gradient with fewer than 16 columns (the two trainable extra-token rows) is computed from fp32
  inputs: XLA:CPU's kernel for such products has no bf16 x bf16 -> fp32 form."""
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 8, 24)).astype(np.float32)
  w = rng.normal(size=(24, 2)).astype(np.float32)
  grad = jax.jit(jax.grad(lambda x, w: jnp.sum(layers.matmul(x, w, jnp.bfloat16) ** 2), (0, 1)))
  gx, gw = grad(x, w)
  assert gx.dtype == gw.dtype == jnp.float32 and np.all(np.isfinite(gw))


def test_mlps_shapes_and_squared_relu():
  x = np.array([[1.0, -2.0]], np.float32)
  w_in = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 1.0]], np.float32)  # h = [1, -2, 0] -> relu^2 = [1, 0, 0]
  w_out = np.ones((3, 2), np.float32)

  @jax.jit
  def mlps(x, w_in, w_out):
    f32 = jnp.float32
    return (
      layers.mlp(x, w_in, w_out, "squared_relu", f32),
      layers.swiglu_mlp(x, w_in, w_in, w_out, f32),
      layers.mlp(x, w_in, w_out, "gelu_tanh", f32),
    )

  sq, swiglu, gelu = mlps(x, w_in, w_out)
  np.testing.assert_array_equal(sq, [[1.0, 1.0]])
  h = x @ w_in
  silu = h / (1 + np.exp(-h))
  np.testing.assert_allclose(swiglu, (silu * h) @ w_out, rtol=1e-5)
  chex.assert_shape(gelu, (1, 2))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1)])
def test_fused_attention_equals_the_einsum_path(hq, hkv):
  """`implementation='fused'` (jax.nn.dot_product_attention; XLA's on CPU): the same outputs and
  gradients, with GQA, an ALiBi-style bias and exact zeros for rows with no key."""
  q, k, v, mask = _random_qkv(hq, hkv, dv=8, seed=4)
  mask[0, 1] = False
  bias = np.random.default_rng(5).normal(size=(2, hq, 5, 7)).astype(np.float32)
  for b in (None, bias):

    def loss(q, k, v, impl, b=b):
      return jnp.sum(jnp.sin(layers.attention(q, k, v, mask, jnp.float32, bias=b, implementation=impl)))

    einsum = layers.attention(q, k, v, mask, jnp.float32, bias=b)
    fused = jax.jit(functools.partial(layers.attention, dtype=jnp.float32, implementation="fused"))(
      q, k, v, mask, bias=b
    )
    np.testing.assert_allclose(fused, einsum, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(fused[0, 1], 0.0)
    g_einsum = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, "einsum")
    g_fused = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(q, k, v, "fused")
    chex.assert_trees_all_close(g_fused, g_einsum, atol=1e-5, rtol=1e-5)
