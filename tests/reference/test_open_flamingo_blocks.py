"""OpenFlamingo's resampler and GATED XATTN-DENSE block, converted, against open_flamingo itself
(random weights, fp32): the `ffw_activation='gelu'` flavour and OpenFlamingo's media-attention rule
(a token sees the last image at or before it; tokens before the first image see none)."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.convert import open_flamingo, state_dict
from flamingo_jax.models import gated_xattn, masking
from flamingo_jax.models import perceiver_resampler as resampler_lib

DV, D, HEADS, DIM_HEAD, LATENTS, DEPTH = 16, 24, 2, 8, 4, 2


def test_resampler_and_block_match_open_flamingo(run_reference, tmp_path):
  run_reference("make_open_flamingo_blocks.py", tmp_path)
  tensors = state_dict.read_state_dict(str(tmp_path / "tensors.safetensors"))
  load = lambda name: np.load(tmp_path / f"{name}.npy")  # noqa: E731
  inner = HEADS * DIM_HEAD

  rcfg = resampler_lib.ResamplerConfig(
    dim=DV,
    depth=DEPTH,
    num_latents=LATENTS,
    num_heads=HEADS,
    head_dim=DIM_HEAD,
    max_frames=1,
    ffw_activation="gelu",
  )
  perceiver = {k: v for k, v in tensors.items() if k.startswith("perceiver.")}
  rparams = open_flamingo.convert_resampler(
    perceiver, dim=DV, depth=DEPTH, num_latents=LATENTS, inner=inner, ffw_mult=4, max_frames=1
  )
  resample = hk.without_apply_rng(hk.transform(lambda f: resampler_lib.PerceiverResampler(rcfg)(f)))
  media = resample.apply(rparams, load("features"))
  np.testing.assert_allclose(media, load("media"), atol=1e-4, rtol=0)

  xcfg = gated_xattn.XAttnConfig(num_heads=HEADS, head_dim=DIM_HEAD, media_dim=DV, ffw_activation="gelu")
  blocks = {k: v for k, v in tensors.items() if k.startswith("gated_cross_attn_layers.")}
  xparams = open_flamingo.convert_xattn(blocks, dim=D, media_dim=DV, num_blocks=1, inner=inner, ffw_mult=4)
  p = xparams["lm/gated_xattn"]
  visual = jnp.asarray(load("media"))
  k, v = gated_xattn.media_kv(p, visual, xcfg, jnp.float32)
  locations = load("locations")
  # OpenFlamingo marks the <image> tokens; phi of a token = the images at or before it, minus one.
  media_index = masking.media_index_from_tokens(jnp.asarray(locations.astype(np.int32)), 1)
  mask = gated_xattn.xattn_mask(media_index, gated_xattn.media_owner(visual.shape[1], visual.shape[2]))
  block = jax.tree.map(lambda a: a[0], p)
  y = gated_xattn.gated_xattn_block(block, jnp.asarray(load("x")), k[0], v[0], mask, xcfg, jnp.float32)
  np.testing.assert_allclose(y, load("y"), atol=1e-4, rtol=0)
