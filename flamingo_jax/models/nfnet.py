"""NFNet vision encoder (Brock et al. 2021, "High-Performance Large-Scale Image
Recognition Without Normalization"), without the classifier head.

Flamingo uses an NFNet-F6, contrastively pre-trained (stage 1) and then frozen;
it reads the final stage's spatial grid.

Shapes:
  B batch, H, W image pixels, h, w output grid (H/32, W/32 rounded up),
  C channels, Dv = 2 * widths[-1] the output feature width.

Parameters (all fp32 at creation), under `vision_encoder/`:
  stem_conv{0..3}/{w,gain,bias}, block_{i}/{conv0,conv1,conv1b,conv2,
  conv_shortcut (transition blocks only)}/{w,gain,bias},
  block_{i}/squeeze_excite/{fc0,fc1}/{w,b}, block_{i}/skip_gain [],
  final_conv/{w,gain,bias}.
"""

import math
from collections.abc import Callable
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

# ImageNet statistics for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# GELU rescaled so that it preserves unit variance for N(0, 1) inputs (the
# "gamma" constant of Brock et al., for the tanh-approximate GELU).
_GELU_GAMMA = 1.7015043497085571

_F_WIDTHS = (256, 512, 1536, 1536)
_F_DEPTH_UNIT = (1, 2, 6, 3)
_F_IMSIZES = {  # variant: (train_imsize, test_imsize, drop_rate)
  "F0": (192, 256, 0.2),
  "F1": (224, 320, 0.3),
  "F2": (256, 352, 0.4),
  "F3": (320, 416, 0.4),
  "F4": (384, 512, 0.5),
  "F5": (416, 544, 0.5),
  "F6": (448, 576, 0.5),
}

# variant -> architecture. `drop_rate` is the dropout before the classifier in
# the NFNet paper; it is kept for reference but unused (no classifier here).
NFNET_VARIANTS: dict[str, dict[str, Any]] = {
  **{
    name: {
      "width": list(_F_WIDTHS),
      "depth": [(int(name[1]) + 1) * d for d in _F_DEPTH_UNIT],
      "train_imsize": train,
      "test_imsize": test,
      "drop_rate": drop,
      "group_width": 128,
      "stem_width": [16, 32, 64],
    }
    for name, (train, test, drop) in _F_IMSIZES.items()
  },
  # Small variant for CPU runs (the easy-VQA main job on 64 px images): F0's design, a quarter of
  # its widths, one block per stage but the third.
  "nano": {
    "width": [64, 128, 384, 384],
    "depth": [1, 1, 2, 1],
    "train_imsize": 64,
    "test_imsize": 64,
    "drop_rate": 0.0,
    "group_width": 32,
    "stem_width": [16, 32, 32],
  },
  # Tiny variant for unit tests.
  "test": {
    "width": [16, 32, 32, 32],
    "depth": [1, 1, 1, 1],
    "train_imsize": 32,
    "test_imsize": 32,
    "drop_rate": 0.0,
    "group_width": 8,
    "stem_width": [8, 8, 8],
  },
}

_STRIDES = (1, 2, 2, 2)
_EXPANSION = 0.5


def _variant(variant: str) -> dict[str, Any]:
  if variant not in NFNET_VARIANTS:
    raise ValueError(f"Unknown NFNet variant {variant!r}; expected one of {sorted(NFNET_VARIANTS)}.")
  return NFNET_VARIANTS[variant]


def output_dim(variant: str) -> int:
  """Dv, the channel width of the encoder's outputs for `variant`."""
  return 2 * _variant(variant)["width"][-1]


def scaled_gelu(x: jax.Array) -> jax.Array:
  """GELU times gamma: unit output variance for N(0, 1) inputs."""
  return jax.nn.gelu(x) * _GELU_GAMMA


def standardize_weight(w: jax.Array, gain: jax.Array, eps: float = 1e-4) -> jax.Array:
  """Scaled weight standardisation, in fp32.

  Args:
    w: [kh, kw, Cin/groups, Cout] conv kernel.
    gain: [Cout] learnable gain.
    eps: floor on fan_in * var.

  Returns:
    fp32 [kh, kw, Cin/groups, Cout]: (w - mean) * gain / sqrt(fan_in * var),
    mean and var taken over the fan-in axes (all but the last).
  """
  w = w.astype(jnp.float32)
  fan_in = int(np.prod(w.shape[:-1]))
  mean = jnp.mean(w, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(w, axis=(0, 1, 2), keepdims=True)
  scale = jax.lax.rsqrt(jnp.maximum(var * fan_in, eps)) * gain.astype(jnp.float32)
  return (w - mean) * scale


class WSConv2D(hk.Module):
  """2D convolution (NHWC) with scaled weight standardisation, gain and bias."""

  def __init__(
    self,
    output_channels: int,
    kernel_size: int,
    stride: int = 1,
    feature_group_count: int = 1,
    dtype: Any = jnp.float32,
    name: str | None = None,
  ):
    super().__init__(name=name)
    self.output_channels = output_channels
    self.kernel_size = kernel_size
    self.stride = stride
    self.feature_group_count = feature_group_count
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, H/stride, W/stride, Cout] in `dtype`."""
    cin = x.shape[-1]
    if cin % self.feature_group_count:
      raise ValueError(
        f"{self.module_name}: {cin} input channels not divisible by {self.feature_group_count} groups."
      )
    k = self.kernel_size
    w_shape = (k, k, cin // self.feature_group_count, self.output_channels)
    w = hk.get_parameter(
      "w", w_shape, jnp.float32, init=hk.initializers.VarianceScaling(1.0, "fan_in", "normal")
    )
    gain = hk.get_parameter("gain", (self.output_channels,), jnp.float32, init=jnp.ones)
    bias = hk.get_parameter("bias", (self.output_channels,), jnp.float32, init=jnp.zeros)
    weight = standardize_weight(w, gain).astype(self.dtype)
    out = jax.lax.conv_general_dilated(
      x.astype(self.dtype),
      weight,
      window_strides=(self.stride, self.stride),
      padding="SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=self.feature_group_count,
    )
    return out + bias.astype(self.dtype)


class SqueezeExcite(hk.Module):
  """Squeeze-excite gate, computed in fp32 (it is tiny)."""

  def __init__(self, channels: int, ratio: float = 0.5, name: str | None = None):
    super().__init__(name=name)
    self.channels = channels
    self.hidden = max(1, int(channels * ratio))

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, h, w, C] -> gate [B, 1, 1, C] in (0, 1), dtype of x."""
    h = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    h = jax.nn.relu(hk.Linear(self.hidden, name="fc0")(h))
    h = jax.nn.sigmoid(hk.Linear(self.channels, name="fc1")(h))
    return h[:, None, None, :].astype(x.dtype)


class NFBlock(hk.Module):
  """NF bottleneck block: 1x1 -> grouped 3x3 -> grouped 3x3 -> 1x1, SE.

  out = shortcut + alpha * skip_gain * stochdepth(2 * se(r) * r), with r the
  residual branch applied to beta * act(x). skip_gain starts at 0, so at init
  the block is its shortcut (the identity unless it is a transition block).
  """

  def __init__(
    self,
    in_ch: int,
    out_ch: int,
    *,
    stride: int,
    beta: float,
    alpha: float,
    group_width: int,
    se_ratio: float = 0.5,
    stochdepth_rate: float = 0.0,
    dtype: Any = jnp.float32,
    activation: Callable[[jax.Array], jax.Array] = scaled_gelu,
    name: str | None = None,
  ):
    super().__init__(name=name)
    self.in_ch, self.out_ch = in_ch, out_ch
    self.stride = stride
    self.beta, self.alpha = beta, alpha
    self.se_ratio = se_ratio
    self.stochdepth_rate = stochdepth_rate
    self.dtype = dtype
    self.activation = activation
    groups = max(1, int(out_ch * _EXPANSION) // group_width)
    self.groups = groups
    self.width = groups * group_width  # Rounded to whole groups.
    self.use_projection = stride > 1 or in_ch != out_ch

  def __call__(self, x: jax.Array, is_training: bool) -> jax.Array:
    """[B, H, W, in_ch] -> [B, H/stride, W/stride, out_ch]."""
    conv = lambda c, k, name, **kw: WSConv2D(c, k, dtype=self.dtype, name=name, **kw)
    act = self.activation
    out = act(x) * self.beta
    if self.stride > 1:  # Average-pool downsampling on the shortcut.
      shortcut = hk.avg_pool(out, window_shape=(1, 2, 2, 1), strides=(1, 2, 2, 1), padding="SAME")
      shortcut = conv(self.out_ch, 1, "conv_shortcut")(shortcut)
    elif self.use_projection:
      shortcut = conv(self.out_ch, 1, "conv_shortcut")(out)
    else:
      shortcut = x
    out = conv(self.width, 1, "conv0")(out)
    out = conv(self.width, 3, "conv1", stride=self.stride, feature_group_count=self.groups)(act(out))
    out = conv(self.width, 3, "conv1b", feature_group_count=self.groups)(act(out))
    out = conv(self.out_ch, 1, "conv2")(act(out))
    out = 2.0 * SqueezeExcite(self.out_ch, self.se_ratio, name="squeeze_excite")(out) * out
    if is_training and 0.0 < self.stochdepth_rate < 1.0:
      out = stochastic_depth(hk.next_rng_key(), out, self.stochdepth_rate)
    skip_gain = hk.get_parameter("skip_gain", (), jnp.float32, init=jnp.zeros)
    out = out * (skip_gain * self.alpha).astype(out.dtype)
    return out + shortcut.astype(out.dtype)


def stochastic_depth(rng: jax.Array, x: jax.Array, drop_rate: float) -> jax.Array:
  """Zeroes whole examples of x [B, ...] with probability drop_rate.

  As in the NFNet reference, kept examples are not rescaled by 1/keep_prob.
  """
  keep = jax.random.bernoulli(rng, 1.0 - drop_rate, (x.shape[0],))
  return x * keep.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)


def block_schedule(variant: str, alpha: float = 0.2, stochdepth_rate: float = 0.1) -> list[dict[str, Any]]:
  """Per-block settings of the body, in order.

  Returns one dict per block: in_ch, out_ch, stride, stage, beta (the
  expected-variance pre-multiplier 1 / expected_std of the block's input) and
  stochdepth_rate (stochdepth_rate * index / num_blocks).
  """
  cfg = _variant(variant)
  num_blocks = sum(cfg["depth"])
  ch = cfg["width"][0] // 2
  expected_std = 1.0
  blocks = []
  for stage, (width, depth, stride) in enumerate(zip(cfg["width"], cfg["depth"], _STRIDES)):
    for j in range(depth):
      index = len(blocks)
      blocks.append(
        {
          "in_ch": ch,
          "out_ch": width,
          "stride": stride if j == 0 else 1,
          "stage": stage,
          "beta": 1.0 / expected_std,
          "stochdepth_rate": stochdepth_rate * index / num_blocks,
        }
      )
      ch = width
      # A transition block's output has unit variance again (its shortcut is
      # a fresh projection of a unit-variance input); then each block adds
      # alpha^2 of variance.
      if j == 0:
        expected_std = 1.0
      expected_std = (expected_std**2 + alpha**2) ** 0.5
  return blocks


def largest_activation(variant: str, image_size: int) -> int:
  """Elements per image of the NFNet's largest activation (stem and block outputs, bottlenecks)."""
  cfg = NFNET_VARIANTS[variant]
  side = math.ceil(image_size / 2)
  largest = side * side * max(cfg["stem_width"])
  side = math.ceil(side / 2)
  largest = max(largest, side * side * cfg["width"][0] // 2)
  for spec in block_schedule(variant):
    out_side = math.ceil(side / spec["stride"])
    largest = max(largest, side * side * spec["in_ch"], out_side * out_side * spec["out_ch"])
    side = out_side
  return largest


def grid_size(variant: str, image_size: int) -> int:
  """Lv, the positions of the output grid: five stride-2 'SAME' stages."""
  del variant  # every variant downsamples 32x
  side = image_size
  for _ in range(5):
    side = math.ceil(side / 2)
  return side * side


class NFNet(hk.Module):
  """Normaliser-free ResNet (NFNet-F*) feature extractor, no classifier."""

  def __init__(
    self,
    variant: str,
    name: str = "vision_encoder",
    *,
    dtype: Any = jnp.float32,
    stochdepth_rate: float = 0.1,
    alpha: float = 0.2,
    se_ratio: float = 0.5,
  ):
    """Builds the encoder.

    Args:
      variant: a key of NFNET_VARIANTS ('F0'..'F6', 'test').
      name: module name (Flamingo restores the encoder by this path).
      dtype: compute dtype of the activations (fp32 or bf16). Parameters are
        fp32; weight standardisation and squeeze-excite run in fp32.
      stochdepth_rate: stochastic depth rate of the last block; block i of n
        uses stochdepth_rate * i / n. Applied only when is_training.
      alpha: residual branch scale.
      se_ratio: squeeze-excite bottleneck ratio.
    """
    super().__init__(name=name)
    if not 0.0 <= stochdepth_rate < 1.0:
      raise ValueError(f"{name}: stochdepth_rate must be in [0, 1), got {stochdepth_rate}.")
    self.variant = variant
    self.config = _variant(variant)
    self.dtype = dtype
    self.stochdepth_rate = stochdepth_rate
    self.alpha = alpha
    self.se_ratio = se_ratio

  def __call__(self, images: jax.Array, is_training: bool) -> dict[str, jax.Array]:
    """Encodes images.

    Args:
      images: float [B, H, W, 3] RGB in [0, 1].
      is_training: enables stochastic depth (needs an rng).

    Returns:
      {'grid': [B, h, w, Dv] final conv output after its activation, 'pooled':
      [B, Dv] its spatial mean}, both in `dtype`.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"{self.module_name}: images must be [B, H, W, 3], got shape {images.shape}.")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)

    conv = lambda c, k, s, name: WSConv2D(c, k, stride=s, dtype=self.dtype, name=name)
    stem = list(self.config["stem_width"]) + [self.config["width"][0] // 2]
    for i, (ch, stride) in enumerate(zip(stem, (2, 1, 1, 2))):
      if i:
        x = scaled_gelu(x)
      x = conv(ch, 3, stride, f"stem_conv{i}")(x)

    schedule = block_schedule(self.variant, self.alpha, self.stochdepth_rate)
    for i, spec in enumerate(schedule):
      x = NFBlock(
        spec["in_ch"],
        spec["out_ch"],
        stride=spec["stride"],
        beta=spec["beta"],
        alpha=self.alpha,
        group_width=self.config["group_width"],
        se_ratio=self.se_ratio,
        stochdepth_rate=spec["stochdepth_rate"],
        dtype=self.dtype,
        name=f"block_{i}",
      )(x, is_training=is_training)

    x = scaled_gelu(conv(output_dim(self.variant), 1, 1, "final_conv")(x))
    pooled = jnp.mean(x, axis=(1, 2), dtype=jnp.float32).astype(x.dtype)
    return {"grid": x, "pooled": pooled}
