"""One GATED XATTN-DENSE block: phi isolation (bit-exact), empty rows, p_next, zero gates, mask shapes."""

import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import gated_xattn, layers, masking

CFG = gated_xattn.XAttnConfig(every=1, num_heads=2, head_dim=8, ffw_mult=4, media_dim=12)
D, B, T, N, R = 16, 2, 8, 3, 4
IMAGE_ID = 99
# Row 0: three images; row 1: one image (media items 1 and 2 are padding nobody attends to).
TOKENS = np.array([[1, IMAGE_ID, 2, 3, IMAGE_ID, 4, IMAGE_ID, 5], [1, 2, IMAGE_ID, 3, 4, 5, 6, 7]], np.int32)


def _random_params(num_blocks=1, seed=0):
  """Stacked block params [X, ...] with random values everywhere (gates included, non-zero)."""
  init = hk.transform(lambda: gated_xattn.GatedXAttnParams(CFG, D, num_blocks)())
  shapes = jax.eval_shape(init.init, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32) * 0.5, shapes)
  return params["gated_xattn"]


def _block_params(seed=0):
  p = {k: v[0] for k, v in _random_params(seed=seed).items()}
  p["attn_gate"], p["ffw_gate"] = np.float32(0.7), np.float32(-0.4)
  return p


@jax.jit
def _block(p, y, k, v, media_index):
  mask = gated_xattn.xattn_mask(media_index, gated_xattn.media_owner(N, R))
  return gated_xattn.gated_xattn_block(p, y, k, v, mask, CFG, jnp.float32)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  y = rng.normal(size=(B, T, D)).astype(np.float32)
  k = rng.normal(size=(B, N * R, CFG.num_heads, CFG.head_dim)).astype(np.float32)
  v = rng.normal(size=(B, N * R, CFG.num_heads, CFG.head_dim)).astype(np.float32)
  return _block_params(), y, k, v


def _perturb_item(a, j, seed):
  a = a.copy()
  a[:, j * R : (j + 1) * R] = np.random.default_rng(seed).normal(size=a[:, j * R : (j + 1) * R].shape)
  return a


def _check_depends_only_on_phi(inputs, media_index):
  p, y, k, v = inputs
  media_index = np.asarray(media_index)
  base = np.asarray(_block(p, y, k, v, media_index))
  for j in range(N):
    out = np.asarray(_block(p, y, _perturb_item(k, j, 10 + j), _perturb_item(v, j, 20 + j), media_index))
    sees_j = media_index == j
    np.testing.assert_array_equal(out[~sees_j], base[~sees_j])  # bit-identical
    if sees_j.any():
      assert np.abs(out[sees_j] - base[sees_j]).min() > 1e-5, j  # every token that sees j moved


def test_token_output_depends_only_on_its_media_item(inputs):
  phi = masking.media_index_from_tokens(TOKENS, IMAGE_ID)
  np.testing.assert_array_equal(phi, [[-1, 0, 0, 0, 1, 1, 2, 2], [-1, -1, 0, 0, 0, 0, 0, 0]])
  _check_depends_only_on_phi(inputs, phi)


def test_p_next_token_output_depends_on_the_next_image(inputs):
  phi = masking.media_index_from_tokens(TOKENS, IMAGE_ID, attend_next=True)
  np.testing.assert_array_equal(phi, [[0, 0, 1, 1, 1, 2, 2, -1], [0, 0, 0, -1, -1, -1, -1, -1]])
  _check_depends_only_on_phi(inputs, phi)
  # Token 2 of row 0 follows image 0 but, under p_next, looks at image 1 only.
  p, y, k, v = inputs
  base = _block(p, y, k, v, phi)
  changed0 = _block(p, y, _perturb_item(k, 0, 5), _perturb_item(v, 0, 6), phi)
  changed1 = _block(p, y, _perturb_item(k, 1, 7), _perturb_item(v, 1, 8), phi)
  np.testing.assert_array_equal(changed0[0, 2], base[0, 2])
  assert np.abs(np.asarray(changed1[0, 2] - base[0, 2])).max() > 1e-5


def test_tokens_without_media_get_only_the_dense_path(inputs):
  p, y, k, v = inputs
  phi = np.asarray(masking.media_index_from_tokens(TOKENS, IMAGE_ID))
  none = phi < 0
  out = np.asarray(_block(p, y, k, v, phi))
  zero_kv = np.asarray(_block(p, y, np.zeros_like(k), np.zeros_like(v), phi))
  np.testing.assert_array_equal(out[none], zero_kv[none])  # attention contribution exactly zero
  assert np.abs(out[~none] - zero_kv[~none]).max() > 1e-4  # where a token has media it matters

  @jax.jit
  def dense_only(p, y):
    h = layers.layer_norm(y, p["ffw_norm_scale"], p["ffw_norm_bias"])
    return y + jnp.tanh(p["ffw_gate"]) * layers.mlp(h, p["ffw_in"], p["ffw_out"], "squared_relu", jnp.float32)

  np.testing.assert_allclose(out[none], np.asarray(dense_only(p, y))[none], rtol=1e-6, atol=1e-6)
  # All tokens without media (phi = -1 everywhere): the whole block is the dense path.
  all_none = np.full((B, T), -1, np.int32)
  np.testing.assert_allclose(_block(p, y, k, v, all_none), dense_only(p, y), rtol=1e-6, atol=1e-6)


def test_zero_gates_make_the_block_the_identity(inputs):
  p, y, k, v = inputs
  p = dict(p, attn_gate=np.float32(0.0), ffw_gate=np.float32(0.0))
  phi = masking.media_index_from_tokens(TOKENS, IMAGE_ID)
  np.testing.assert_array_equal(_block(p, y, k, v, phi), y)


def test_gates_scale_the_two_branches_through_tanh(inputs):
  p, y, k, v = inputs
  phi = masking.media_index_from_tokens(TOKENS, IMAGE_ID)
  attn_only = lambda g: _block(dict(p, attn_gate=np.float32(g), ffw_gate=np.float32(0.0)), y, k, v, phi)
  np.testing.assert_allclose(
    (attn_only(2.0) - y) * np.tanh(0.5), (attn_only(0.5) - y) * np.tanh(2.0), rtol=1e-4, atol=1e-5
  )


def test_media_owner_and_xattn_mask():
  owner = gated_xattn.media_owner(3, 2)
  np.testing.assert_array_equal(owner, [0, 0, 1, 1, 2, 2])
  media_index = np.array([[-1, 0, 2], [1, 1, -1]], np.int32)
  mask = np.asarray(jax.jit(gated_xattn.xattn_mask)(media_index, owner))
  chex.assert_shape(mask, (2, 3, 6))
  assert mask.dtype == bool
  np.testing.assert_array_equal(mask[0], [[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 0, 0, 1, 1]])
  np.testing.assert_array_equal(mask[1], [[0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]])


def test_all_previous_media_switch_opens_every_item_up_to_phi():
  owner = gated_xattn.media_owner(3, 2)
  media_index = np.array([[-1, 0, 2]], np.int32)
  mask = np.asarray(gated_xattn.xattn_mask(media_index, owner, all_previous=True))
  np.testing.assert_array_equal(mask[0], [[0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])


def test_ungated_switch_adds_both_branches_at_full_weight(inputs):
  """gating='none' (Table 3's 'w/o tanh gating') is the tanh block with tanh(gate) replaced by 1."""
  import dataclasses  # pylint: disable=g-import-not-at-top

  p, y, k, v = inputs
  mask = gated_xattn.xattn_mask(
    masking.media_index_from_tokens(TOKENS, IMAGE_ID), gated_xattn.media_owner(N, R)
  )
  ungated = dataclasses.replace(CFG, gating="none")
  zero = dict(p, attn_gate=np.float32(0.0), ffw_gate=np.float32(0.0))
  out = gated_xattn.gated_xattn_block(zero, y, k, v, mask, ungated, jnp.float32)
  assert not np.allclose(out, y)  # not the identity at zero gates
  huge = dict(p, attn_gate=np.float32(20.0), ffw_gate=np.float32(20.0))  # tanh(20) == 1 in fp32
  want = gated_xattn.gated_xattn_block(huge, y, k, v, mask, CFG, jnp.float32)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="xattn.gating"):
    dataclasses.replace(CFG, gating="sigmoid")


def test_params_and_media_kv_shapes():
  params = _random_params(num_blocks=3)
  chex.assert_shape(params["attn_gate"], (3,))
  chex.assert_shape(params["k"], (3, CFG.media_dim, CFG.num_heads * CFG.head_dim))
  chex.assert_shape(params["ffw_in"], (3, D, CFG.ffw_mult * D))
  visual = np.random.default_rng(2).normal(size=(B, N, R, CFG.media_dim)).astype(np.float32)
  kv = jax.jit(functools.partial(gated_xattn.media_kv, cfg=CFG, dtype=jnp.float32))
  k, v = kv(params, visual)
  chex.assert_shape([k, v], (3, B, N * R, CFG.num_heads, CFG.head_dim))
  # Flattened media tokens keep the item order that `media_owner` assumes: item 1's rows move alone.
  visual2 = visual.copy()
  visual2[:, 1] += 1.0
  k2, _ = kv(params, visual2)
  moved = np.abs(np.asarray(k2 - k)).max(axis=(0, 1, 3, 4)) > 0
  np.testing.assert_array_equal(moved, np.asarray(gated_xattn.media_owner(N, R)) == 1)


def test_gates_initialise_to_zero():
  def only_gates_initialised(next_creator, shape, dtype, init, context):
    # The random initialisers compile slowly on CPU; the gates' own initialiser is what is checked.
    if context.name not in ("attn_gate", "ffw_gate"):
      init = lambda shape, dtype: jnp.full(shape, jnp.nan, dtype)
    return next_creator(shape, dtype, init)

  def make():
    with hk.custom_creator(only_gates_initialised):
      return gated_xattn.GatedXAttnParams(CFG, D, 2)()

  params = jax.jit(hk.transform(make).init)(jax.random.PRNGKey(0))["gated_xattn"]
  np.testing.assert_array_equal(params["attn_gate"], 0.0)
  np.testing.assert_array_equal(params["ffw_gate"], 0.0)
