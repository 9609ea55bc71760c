"""IDEFICS's GATED XATTN-DENSE block (transformers' IdeficsGatedCrossAttentionLayer) and resampler
(IdeficsPerceiverResampler), converted, against transformers itself: the project's modules in their
IDEFICS flavours (block: RMSNorm, SwiGLU, q/k RMSNorm, float or per-channel alphas, tokens that see no
image; resampler: ReLU MLP, optional q/k LayerNorms)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.convert import idefics, state_dict
from flamingo_jax.models import gated_xattn
from flamingo_jax.models import perceiver_resampler as resampler_lib

D, HEADS, F, DV, N, R = 32, 4, 48, 16, 3, 4


@pytest.mark.parametrize("alpha_type, qk_norm", [("vector", True), ("float", False)])
def test_block_matches_transformers(run_reference, tmp_path, alpha_type, qk_norm):
  run_reference("make_idefics_block.py", tmp_path, alpha_type, int(qk_norm))
  tensors = state_dict.read_state_dict(str(tmp_path / "tensors.safetensors"))
  vector = alpha_type == "vector"
  params = idefics.convert_xattn(
    tensors,
    dim=D,
    media_dim=DV,
    num_heads=HEADS,
    ffw_hidden=F,
    num_blocks=1,
    vector_gates=vector,
    qk_norm=qk_norm,
  )["lm/gated_xattn"]
  cfg = gated_xattn.XAttnConfig(
    num_heads=HEADS,
    head_dim=D // HEADS,
    media_dim=DV,
    norm="rms",
    norm_eps=1e-6,  # IdeficsConfig's rms_norm_eps
    ffw="swiglu",
    ffw_hidden=F,
    qk_norm=qk_norm,
    gate_shape="vector" if vector else "scalar",
  )
  load = lambda name: np.load(tmp_path / f"{name}.npy")  # noqa: E731
  visual = jnp.asarray(load("images")).reshape(2, N, R, DV)
  k, v = gated_xattn.media_kv(params, visual, cfg, jnp.float32)
  mask = gated_xattn.xattn_mask(jnp.asarray(load("phi")), gated_xattn.media_owner(N, R))
  block = jax.tree.map(lambda a: a[0], params)
  y = gated_xattn.gated_xattn_block(block, jnp.asarray(load("x")), k[0], v[0], mask, cfg, jnp.float32)
  np.testing.assert_allclose(y, load("y"), atol=1e-4, rtol=0)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_resampler_matches_transformers(run_reference, tmp_path, qk_norm):
  run_reference("make_idefics_resampler.py", tmp_path, int(qk_norm))
  tensors = state_dict.read_state_dict(str(tmp_path / "tensors.safetensors"))
  params = idefics.convert_resampler(
    tensors, dim=16, depth=2, num_latents=4, num_heads=2, head_dim=8, qk_norm=qk_norm, max_frames=1
  )
  cfg = resampler_lib.ResamplerConfig(
    dim=16,
    depth=2,
    num_latents=4,
    num_heads=2,
    head_dim=8,
    max_frames=1,
    ffw_activation="relu",
    qk_norm=qk_norm,
  )
  resample = hk.without_apply_rng(hk.transform(lambda f: resampler_lib.PerceiverResampler(cfg)(f)))
  context = np.load(tmp_path / "context.npy")
  out = resample.apply(params, context[:, None, None])  # [B, N=1, F=1, S, Dv]
  np.testing.assert_allclose(out[:, 0], np.load(tmp_path / "resampled.npy"), atol=1e-4, rtol=0)
