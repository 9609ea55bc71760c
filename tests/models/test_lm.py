"""The decoder LM alone (`DecoderLM` in `hk.transform`): padding, variants, KV cache, lm_only, remat, traces.

The tiny LM has 5 layers: xattn `every=2` runs two scanned groups and a tail group, `every=5` one group,
`every=1` five groups. Parameters are random (gates open) unless a test says otherwise; they are drawn in
numpy from `jax.eval_shape` shapes because the random initialisers compile slowly on these CPUs.
"""

import dataclasses
import functools

import chex
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.models import flamingo, gated_xattn, kv_cache, masking
from flamingo_jax.models import lm as lm_lib

LM = lm_lib.LMConfig(**flamingo.SIZES["tiny"]["lm"])
V, E = LM.vocab_size, LM.num_extra_tokens
IMAGE_ID = V
R, DR = 4, 24  # visual tokens per media item, media width


def _xattn(every, first=0):
  return gated_xattn.XAttnConfig(every=every, first=first, num_heads=2, head_dim=16, ffw_mult=4, media_dim=DR)


def _transform(every=2, lm_cfg=LM, remat="none", first=0):
  xcfg = _xattn(every, first)

  def fwd(tokens, visual=None, media_index=None, token_mask=None, cache=None, lm_only=False):
    return lm_lib.DecoderLM(lm_cfg, xcfg, remat=remat, name="lm")(
      tokens, visual=visual, media_index=media_index, token_mask=token_mask, cache=cache, lm_only=lm_only
    )

  return hk.without_apply_rng(hk.transform(fwd))


@functools.cache
def _apply(every=2, lm_cfg=LM, remat="none"):
  """Jitted apply, shared between tests so that equal shapes compile once (compiles dominate here)."""
  return jax.jit(_transform(every, lm_cfg, remat).apply, static_argnames="lm_only")


def _random_params(model, gate=1.0, seed=0):
  """Random params for `model`; gates are `gate + N(0, 0.3)` (`gate=None`: exactly 0, as at init)."""
  shapes = jax.eval_shape(
    model.init,
    jax.random.PRNGKey(0),
    jax.ShapeDtypeStruct((1, 4), jnp.int32),
    visual=jax.ShapeDtypeStruct((1, 1, R, DR), jnp.float32),
  )
  rng = np.random.default_rng(seed)

  def value(module, name, shape):
    n = rng.normal(size=shape)
    if name in ("attn_gate", "ffw_gate"):
      return np.zeros(shape) if gate is None else gate + 0.3 * n
    if "norm" in name or "norm" in module:
      return 0.1 * n if "bias" in name else 1.0 + 0.1 * n
    return n / np.sqrt(shape[-2] if len(shape) > 1 else shape[-1])

  return {m: {k: value(m, k, s.shape).astype(np.float32) for k, s in d.items()} for m, d in shapes.items()}


def _visual(batch, num_media, seed=1):
  return np.random.default_rng(seed).normal(size=(batch, num_media, R, DR)).astype(np.float32)


def _phi(tokens):
  return np.asarray(masking.media_index_from_tokens(jnp.asarray(tokens), IMAGE_ID))


# Every batch below is [2, 11] with two media items, so that the tests share compiled functions.
SINGLE = np.array([[5, IMAGE_ID, 7, 9, 33, IMAGE_ID, 11, 12]], np.int32)
OTHER = np.array([[IMAGE_ID, 3, 4, 5, 6, 7, IMAGE_ID, 8, 9, 10, 11]], np.int32)
PAD = OTHER.shape[1] - SINGLE.shape[1]
ALL_VALID = np.ones((2, OTHER.shape[1]), bool)


@pytest.mark.parametrize("every", [1, 2, 5])
def test_left_padding_gives_the_unpadded_logits(every):
  apply = _apply(every)
  params = _random_params(_transform(every), seed=every)
  visual = _visual(2, 2)
  # Unpadded: SINGLE followed by more tokens, which causal attention hides from SINGLE's positions.
  unpadded = np.concatenate([np.concatenate([SINGLE, OTHER[:, 1 : PAD + 1]], axis=1), OTHER])
  want = apply(params, unpadded, visual, _phi(unpadded), ALL_VALID)[0]
  padded = np.concatenate([np.pad(SINGLE, ((0, 0), (PAD, 0))), OTHER])  # pad id 0 on the left
  token_mask = ALL_VALID.copy()
  token_mask[0, :PAD] = False
  got = apply(params, padded, visual, _phi(padded), token_mask)[0]
  chex.assert_shape(got, (2, OTHER.shape[1], V + E))
  chex.assert_tree_all_finite(got)
  np.testing.assert_allclose(got[0, PAD:], want[0, : SINGLE.shape[1]], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-6, atol=1e-6)  # the other row is unaffected
  # And the images matter (gates are open): the logits from the first image on move with the media.
  moved = apply(params, unpadded, visual + 1.0, _phi(unpadded), ALL_VALID)[0]
  np.testing.assert_array_equal(moved[0, :1], want[0, :1])
  assert np.abs(np.asarray(moved[0, 1:] - want[0, 1:])).min() > 0


def test_gelu_layernorm_untied_variant():
  cfg = dataclasses.replace(LM, mlp="gelu", norm="layer", tie_embeddings=False)
  model = _transform(5, cfg)
  params = _random_params(model)
  assert set(params["lm/unembed"]) == {"w"} and params["lm/unembed"]["w"].shape == (LM.dim, V)
  assert set(params["lm/extra_unembed"]) == {"w"} and params["lm/extra_unembed"]["w"].shape == (LM.dim, E)
  assert set(params["lm/final_norm"]) == {"scale", "bias"}
  assert set(params["lm/layers"]) == {
    "attn_norm",
    "attn_norm_bias",
    "q",
    "k",
    "v",
    "o",
    "mlp_norm",
    "mlp_norm_bias",
    "up",
    "down",
  }
  apply = _apply(5, cfg)
  logits, cache = apply(params, OTHER, _visual(1, 2), _phi(OTHER))
  assert cache is None
  chex.assert_shape(logits, (1, OTHER.shape[1], V + E))
  chex.assert_tree_all_finite(logits)
  # Untied: the output rows come from `unembed`/`extra_unembed`, not from the embedding tables.
  changed = dict(params, **{"lm/extra_unembed": {"w": params["lm/extra_unembed"]["w"] + 1.0}})
  other = apply(changed, OTHER, _visual(1, 2), _phi(OTHER))[0]
  np.testing.assert_array_equal(other[..., :V], logits[..., :V])
  assert np.abs(np.asarray(other[..., V:] - logits[..., V:])).min() > 0


# --------------------------------------------------------------------------------------- KV cache
STEPS = 6  # generated tokens: one from the prefill, then STEPS - 1 decode steps
PROMPT = np.array([[0, 0, 3, IMAGE_ID, 5], [IMAGE_ID, 9, IMAGE_ID, 12, 13]], np.int32)
PROMPT_MASK = np.array([[0, 0, 1, 1, 1], [1] * 5], bool)
_DECODE = _transform(2)


@jax.jit
def _prefill(params, tokens, visual, media_index, token_mask, cache):
  return _DECODE.apply(params, tokens, visual, media_index, token_mask, cache)


@jax.jit
@chex.assert_max_traces(n=1)
def _decode_step(params, token, cache):
  """One token [B, 1] with the media K/V and last media index taken from the cache."""
  return _DECODE.apply(params, token, cache=cache)


@pytest.fixture(scope="module")
def decoding():
  params = _random_params(_DECODE, seed=7)
  visual = _visual(2, 2, seed=8)
  cache = kv_cache.init_cache(LM, _xattn(2), PROMPT.shape[0], 16, num_media=2, tokens_per_media=R)
  logits, cache = _prefill(params, PROMPT, visual, _phi(PROMPT), PROMPT_MASK, cache)
  cached_logits = [logits[:, -1]]
  generated = [jnp.argmax(logits[:, -1], axis=-1)]
  for _ in range(STEPS - 1):
    logits, cache = _decode_step(params, generated[-1][:, None], cache)
    cached_logits.append(logits[:, 0])
    generated.append(jnp.argmax(logits[:, 0], axis=-1))
  return params, visual, np.stack(generated, 1), np.stack(cached_logits, 1), cache


def test_cached_greedy_decoding_equals_uncached_argmax(decoding):
  params, visual, generated, cached_logits, cache = decoding
  b, p = PROMPT.shape
  # Uncached: one fixed-length buffer (one compile); causality makes the positions past t irrelevant.
  tokens = np.zeros((b, p + STEPS), np.int32)
  tokens[:, :p] = PROMPT
  token_mask = np.concatenate([PROMPT_MASK, np.ones((b, STEPS), bool)], axis=1)
  phi = _phi(PROMPT)
  media_index = np.concatenate([phi, np.repeat(phi[:, -1:], STEPS, axis=1)], axis=1)
  for i in range(STEPS):
    logits = np.asarray(_apply(2)(params, tokens, visual, media_index, token_mask)[0])[:, p - 1 + i]
    np.testing.assert_allclose(cached_logits[:, i], logits, rtol=1e-4, atol=1e-4)
    tokens[:, p + i] = logits.argmax(-1)
  np.testing.assert_array_equal(generated, tokens[:, p:])
  assert int(cache.index) == p + STEPS - 1
  np.testing.assert_array_equal(cache.positions, PROMPT_MASK.sum(1) + STEPS - 1)
  np.testing.assert_array_equal(cache.last_media, [0, 1])


def test_decode_step_compiles_once(decoding):
  params, _, generated, _, cache = decoding
  # `_decode_step` is wrapped in chex.assert_max_traces(n=1): more steps on the returned cache (whose
  # dtypes and weak types must match the prefill's) would raise on a retrace.
  token = jnp.asarray(generated[:, -1:])
  for _ in range(3):
    logits, cache = _decode_step(params, token, cache)
    token = jnp.argmax(logits, axis=-1)
  chex.assert_tree_all_finite(logits)


# ---------------------------------------------------------------------------------------- lm_only
def test_lm_only_equals_xattn_model_at_init():
  apply = _apply(2)
  params = _random_params(_transform(2), gate=None, seed=3)  # gates exactly 0, as at initialisation
  tokens = np.concatenate([OTHER, OTHER[:, ::-1]])
  with_media = apply(params, tokens, _visual(2, 2, seed=4), _phi(tokens), ALL_VALID)[0]
  lm_only = apply(params, tokens, None, None, ALL_VALID, lm_only=True)[0]
  np.testing.assert_array_equal(with_media, lm_only)
  # With open gates the two differ: lm_only really skips the blocks.
  params = _random_params(_transform(2), seed=3)
  lm_only_open = apply(params, tokens, None, None, ALL_VALID, lm_only=True)[0]
  np.testing.assert_array_equal(lm_only_open, lm_only)
  assert (
    np.abs(
      np.asarray(apply(params, tokens, _visual(2, 2, seed=4), _phi(tokens), ALL_VALID)[0] - lm_only)
    ).max()
    > 1e-3
  )


# ------------------------------------------------------------------------------------------ remat
def _loss_and_grads(remat, params, visual, tokens):
  # every=5 (one scanned group): a gradient compiles in half the time of every=2 on these CPUs.
  model = _transform(5, remat=remat)
  media_index = _phi(tokens)

  def loss(params):
    logits = model.apply(params, tokens, visual, media_index)[0]
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0]), logits

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.fixture(scope="module")
def remat_reference():
  params = _random_params(_transform(5), seed=5)
  visual = _visual(1, 2, seed=6)
  return params, visual, _loss_and_grads("none", params, visual, OTHER)


# Three gradient compiles take ~25 s of CPU here: opt-in with `-m slow`.
@pytest.mark.slow
@pytest.mark.parametrize("remat", ["full", "dots", "names"])
def test_remat_gives_the_same_logits_and_gradients(remat_reference, remat):
  params, visual, ((loss, logits), grads) = remat_reference
  (loss_r, logits_r), grads_r = _loss_and_grads(remat, params, visual, OTHER)
  np.testing.assert_allclose(loss_r, loss, rtol=1e-6)
  np.testing.assert_allclose(logits_r, logits, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(grads_r, grads, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(grads["lm/gated_xattn"]["attn_gate"])).max() > 0


@pytest.mark.parametrize("every, first", [(2, 0), (5, 0), (2, 1), (4, 3)])
def test_grouped_and_flat_layer_scans_give_the_same_logits_and_cache(monkeypatch, every, first):
  """Cached calls (decoding) may run the flat scan, others the grouped one: the same function, with
  the paper's placement (first 0) and OpenFlamingo's (first = every - 1: plain layers first)."""
  params = _random_params(_transform(every, first=first), seed=3)
  visual = _visual(1, 2)
  xcfg = _xattn(every, first)
  outputs = []
  for min_tokens in (0, 10**9):  # always grouped (unrolled), always flat when cached
    monkeypatch.setattr(lm_lib, "UNROLL_MIN_TOKENS", min_tokens)
    cache = kv_cache.init_cache(LM, xcfg, 1, 16, num_media=2, tokens_per_media=R)
    fwd = hk.without_apply_rng(
      hk.transform(
        lambda t, v, m, c: lm_lib.DecoderLM(LM, xcfg, scan_unroll=8, name="lm")(
          t, visual=v, media_index=m, cache=c
        )
      )
    )
    outputs.append(fwd.apply(params, OTHER, visual, _phi(OTHER), cache))
  chex.assert_trees_all_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("every, first, blocks", [(2, 0, 3), (2, 1, 2), (4, 3, 1), (1, 0, 5)])
def test_block_count_and_placement(every, first, blocks):
  """Blocks before layers first, first + every, ...: the first `first` layers see no images."""
  assert gated_xattn.num_xattn_blocks(LM.num_layers, every, first) == blocks
  params = _random_params(_transform(every, first=first), seed=4)
  assert params["lm/gated_xattn"]["attn_gate"].shape == (blocks,)
  with pytest.raises(ValueError, match="first must be in"):
    _xattn(every, every)
