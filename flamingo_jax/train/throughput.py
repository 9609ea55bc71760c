"""FLOPs of a training step counted by hand, and the live throughput of the training log (MaxText's
tokens/s/device, TFLOP/s/device and MFU).

Counting rule (multiply-add = 2 FLOPs; matmuls and attention scores only, norms and element-wise
work left out, attention counted in full as XLA computes it, no recomputation counted):
  frozen vision encoder   forward only: 2 N per token (the ViT's layers, patch embedding), or the
                          NFNet's convolutions as XLA counts its (unscanned) forward
  frozen LM               forward plus the gradients of its activations: 2 x forward (4 N per token);
                          no weight gradients (every LM layer lies above the first xattn block)
  trained resampler, xattn blocks   forward, activation and weight gradients: 3 x forward (6 N)
XLA's own cost analysis counts a while loop's body once, so it under-counts the scanned layers; this
count does not depend on how the program is compiled (checked against XLA on an unrolled model:
tests/train/test_throughput.py).

Shapes: b sequences of t tokens with n media of f frames each; Lv visual tokens per frame, R latents.
"""

import math
from collections.abc import Mapping

import haiku as hk
import jax
import jax.numpy as jnp

from flamingo_jax.models import clip_vit, gated_xattn

# Dense bf16 TFLOP/s per chip (datasheets), matched as substrings of `device.device_kind`; more
# specific names first. `train.peak_tflops` overrides it (and gives CPUs an MFU).
PEAK_TFLOPS = (
  ("TPU v6", 918.0),
  ("TPU v5p", 459.0),
  ("TPU v5", 197.0),  # v5e ('TPU v5 lite')
  ("TPU v4", 275.0),
  ("H200", 989.0),
  ("H100", 989.0),
  ("A100", 312.0),
)


def peak_tflops(device_kind: str, override: float = 0.0) -> float:
  """Peak TFLOP/s of one device: `override` when > 0, else the table's, else NaN (unknown, CPUs)."""
  if override > 0:
    return float(override)
  for name, peak in PEAK_TFLOPS:
    if name.lower() in device_kind.lower():
      return peak
  return math.nan


def lm_forward_flops(lm, b: int, t: int) -> float:
  """The decoder LM's forward over b x t tokens (projections, MLP, attention scores, logits)."""
  q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
  mlp_mats = 3 if lm.mlp == "swiglu" else 2
  per_token = 2 * (lm.dim * q + 2 * lm.dim * kv + q * lm.dim + mlp_mats * lm.dim * lm.ffw_hidden)
  vocab = lm.vocab_size + lm.num_extra_tokens
  return lm.num_layers * (b * t * per_token + b * 4 * t * t * q) + 2 * b * t * lm.dim * vocab


def xattn_forward_flops(lm, xa, rs, b: int, t: int, n: int) -> float:
  """The GATED XATTN-DENSE blocks' forward: q/o and FFW per token, k/v per latent, scores per pair."""
  blocks = gated_xattn.num_xattn_blocks(lm.num_layers, xa.every, xa.first)
  inner = xa.num_heads * xa.head_dim
  ffw = 2 * lm.dim * (xa.ffw_hidden or xa.ffw_mult * lm.dim) * (3 if xa.ffw == "swiglu" else 2)
  per_token = 2 * 2 * lm.dim * inner + ffw
  return blocks * (
    b * t * per_token
    + b * n * rs.num_latents * 2 * 2 * rs.dim * inner
    + b * 4 * t * n * rs.num_latents * inner
  )


def resampler_forward_flops(rs, frames: int, lv: int) -> float:
  """The Perceiver Resampler's forward over `frames` frames of Lv tokens (latents attend to [x; latents])."""
  inner, keys = rs.num_heads * rs.head_dim, lv + rs.num_latents
  per_layer = (
    rs.num_latents * 2 * (2 * rs.dim * inner + 2 * rs.dim * rs.ffw_mult * rs.dim)
    + keys * 2 * 2 * rs.dim * inner
    + 4 * rs.num_latents * keys * inner
  )
  return rs.depth * frames * per_layer


def vision_forward_flops(model_cfg) -> tuple[float, int]:
  """(FLOPs of the frozen vision encoder on one frame, Lv its tokens per frame)."""
  size, variant = model_cfg.image_size, model_cfg.vision_variant
  if variant in clip_vit.VARIANTS:
    v = clip_vit.variant(variant)
    patches = (size // v.patch) ** 2
    tokens = 1 + patches
    layer = tokens * 2 * (4 * v.width * v.width + 2 * v.width * v.mlp_dim) + 4 * tokens * tokens * v.width
    flops = patches * 2 * v.patch * v.patch * 3 * v.width + v.layers * layer + 2 * v.width * v.embed_dim
    return float(flops), clip_vit.grid_size(variant, size)
  from flamingo_jax.models import flamingo  # pylint: disable=g-import-not-at-top  (it imports this package)

  def forward(images):
    return flamingo.vision_encoder(variant, jnp.float32)(images, is_training=False)["grid"]

  fn = hk.transform(forward)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  params = jax.eval_shape(fn.init, jax.random.PRNGKey(0), images)
  lowered = jax.jit(fn.apply).lower(params, None, images)
  grid = jax.eval_shape(fn.apply, params, None, images)
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]), int(grid.shape[1] * grid.shape[2])


def step_flops(model_cfg, datasets: Mapping[str, tuple[int, int, int, int]]) -> dict[str, float]:
  """FLOPs of one training step over every dataset: {name: (batch, tokens, media, frames)}.

  Returns {'vision', 'lm', 'trained', 'step'}: the frozen vision forward, the frozen LM (2 x forward),
  the trained parts (3 x forward) and their sum."""
  vision_per_frame, lv = vision_forward_flops(model_cfg)
  lm, xa, rs = model_cfg.lm, model_cfg.xattn, model_cfg.resampler
  vision = lm_total = trained = 0.0
  for b, t, n, f in datasets.values():
    vision += b * n * f * vision_per_frame
    lm_total += 2 * lm_forward_flops(lm, b, t)
    trained += 3 * (xattn_forward_flops(lm, xa, rs, b, t, n) + b * n * resampler_forward_flops(rs, f, lv))
  return dict(vision=vision, lm=lm_total, trained=trained, step=vision + lm_total + trained)


def data_shapes(data_cfg) -> dict[str, tuple[int, int, int, int]]:
  """{name: (batch, tokens, media, frames)} of a training config's `data.datasets`."""
  return {
    name: (int(d.batch_size), int(d.max_tokens), int(d.max_images), int(d.num_frames))
    for name, d in data_cfg.datasets.items()
  }


def throughput(flops: float, tokens: int, step_s: float, devices: int, peak: float) -> dict[str, float]:
  """Per-device rates of a step of `flops` FLOPs over `tokens` text tokens taking `step_s` seconds."""
  tflops = flops / step_s / devices / 1e12
  return dict(tokens_per_s_per_device=tokens / step_s / devices, tflops_per_device=tflops, mfu=tflops / peak)
