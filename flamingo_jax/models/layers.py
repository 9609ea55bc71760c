"""Pure building blocks shared by the language model, cross-attention and resampler.

Shapes: B batch, T query length, S key length, H heads (Hq query heads, Hkv key/value heads), dh head dim,
D model width, F hidden width.

Numerics: every matmul takes its inputs in the compute dtype (bf16 or fp32) and accumulates in fp32
(`preferred_element_type`), which is also the fast path of XLA on CPUs with AMX. Norms, softmax and the
residual stream stay in fp32.
"""

import functools
import math
from collections.abc import Callable

import haiku as hk
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array

# Places an activation by logical axis names, e.g. constrain(x, ("batch", "length", "embed")). The
# model only names axes; the training set-up supplies the mapping to mesh axes
# (`flamingo_jax/parallel/logical.py: activation_constraint`).
ActivationConstraint = Callable[[Array, tuple], Array]


def no_constraint(x: Array, logical_axes: tuple) -> Array:
  """The default `ActivationConstraint`: XLA places activations (one device, evaluation)."""
  del logical_axes
  return x


def matmul(x: Array, w: Array, dtype) -> Array:
  """`x @ w` over the last axis of x, inputs cast to `dtype`, fp32 result."""
  return jnp.einsum("...i,io->...o", x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)


def rms_norm(x: Array, scale: Array, eps: float) -> Array:
  """RMSNorm in fp32. x: [..., D], scale: [D]."""
  x = x.astype(jnp.float32)
  var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)


def layer_norm(x: Array, scale: Array, bias: Array, eps: float = 1e-5) -> Array:
  """LayerNorm in fp32. x: [..., D], scale, bias: [D]."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def rope_angles(positions: Array, head_dim: int, theta: float):
  """cos, sin tables [B, T, dh/2] for integer positions [B, T]."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """Rotary embedding in the Hugging Face "rotate half" layout.

  Feature i is paired with feature i + dh/2 of the same head (llama.cpp pairs 2i with 2i+1; the GGUF importer
  permutes q/k back to this layout). x: [B, T, H, dh]; cos, sin: [B, T, dh/2]. Returns fp32.
  """
  x = x.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def alibi_slopes(num_heads: int, bias_max: float = 8.0) -> Array:
  """[H] ALiBi slopes as MPT computes them: 2^(-bias_max * h / H') for h = 1..H' (H' the next power of
  two), then, when H' > H, the odd-indexed slopes followed by the even ones, first H kept."""
  power = 2 ** math.ceil(math.log2(num_heads))
  slopes = 1.0 / 2.0 ** (jnp.arange(1, power + 1, dtype=jnp.float32) * (bias_max / power))
  if power != num_heads:
    slopes = jnp.concatenate([slopes[1::2], slopes[::2]])[:num_heads]
  return slopes


def alibi_bias(slopes: Array, query_positions: Array, key_positions: Array) -> Array:
  """[B, H, T, S] additive logits slope_h * (key position - query position): -slope per token of
  distance back (MPT's bias up to a per-query constant, which softmax ignores).
  query_positions: int [B, T]; key_positions: int [B, S]."""
  distance = (key_positions[:, None, :] - query_positions[:, :, None]).astype(jnp.float32)
  return slopes[None, :, None, None] * distance[:, None, :, :]


# How attention is computed ('attention' of the LM and xattn configs): 'einsum', two einsums around an
# fp32 softmax (any device); 'fused', `jax.nn.dot_product_attention`: cuDNN's flash attention where the
# step is lowered for CUDA (`fused_attention`), XLA's own elsewhere, CPU included.
ATTENTION_IMPLEMENTATIONS = ("einsum", "fused")
# cuDNN's fused attention takes half-precision inputs only; fp32 steps use XLA's on every platform.
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def cudnn_lowerable(q: Array, k: Array, v: Array, mask: Array) -> bool:
  """Whether `jax.nn.dot_product_attention(implementation='cudnn')` traces for these shapes here:
  it needs a jaxlib with CUDA (a CPU-only one has no cuDNN to ask its version) and its own shape rules."""
  try:
    jax.eval_shape(
      functools.partial(jax.nn.dot_product_attention, implementation="cudnn"), q, k, v, mask=mask
    )
  except (RuntimeError, ValueError, NotImplementedError):
    return False
  return True


def fused_attention(q: Array, k: Array, v: Array, mask: Array, bias: Array | None) -> Array:
  """`jax.nn.dot_product_attention` chosen when the step is lowered, by its platform: cuDNN's flash
  attention for CUDA (half precision, no ALiBi bias, cuDNN present), XLA's otherwise. Inputs as
  `attention`'s, already in the compute dtype; mask [B, 1, T, S]. Returns [B, T, Hq, dv]."""

  def xla(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation="xla")

  if bias is not None or q.dtype not in CUDNN_DTYPES or not cudnn_lowerable(q, k, v, mask):
    return xla(q, k, v, mask)

  def cudnn(q, k, v, mask):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")

  # Both branches are traced; lowering for one platform keeps only its branch (jax.export included).
  return jax.lax.platform_dependent(q, k, v, mask, cuda=cudnn, default=xla)


def attention(
  q: Array, k: Array, v: Array, mask: Array, dtype, bias: Array | None = None, implementation: str = "einsum"
) -> Array:
  """Multi-head attention with grouped K/V heads and exact zeros for fully masked rows.

  q: [B, T, Hq, dh]; k: [B, S, Hkv, dh]; v: [B, S, Hkv, dv]; mask: [B, T, S] bool (True = may attend);
  bias: None or fp32 [B, Hq, T, S] added to the logits (ALiBi).
  Hq must be a multiple of Hkv. Softmax in fp32. A query row with no allowed key returns exactly 0 (a
  softmax over an all-masked row would otherwise average all values).
  Returns [B, T, Hq, dv] in fp32.
  """
  q, k, v = checkpoint_name(q, "attn_q"), checkpoint_name(k, "attn_k"), checkpoint_name(v, "attn_v")
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(
      f"attention implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
    )
  b, t, hq, dh = q.shape
  any_allowed = jnp.any(mask, axis=-1)  # [B, T]
  if implementation == "fused":
    bias = None if bias is None else bias.astype(dtype)
    out = fused_attention(q.astype(dtype), k.astype(dtype), v.astype(dtype), mask[:, None, :, :], bias)
    return jnp.where(any_allowed[:, :, None, None], out.astype(jnp.float32), 0.0)
  hkv = k.shape[2]
  groups = hq // hkv
  q = q.reshape(b, t, hkv, groups, dh).astype(dtype)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
  logits = logits * (dh**-0.5)
  if bias is not None:
    logits = logits + bias.reshape(b, hkv, groups, t, bias.shape[-1])
  allowed = mask[:, None, None, :, :]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(any_allowed[:, None, None, :, None] & allowed, probs, 0.0)
  out = jnp.einsum(
    "bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype), preferred_element_type=jnp.float32
  )
  return out.reshape(b, t, hq, v.shape[-1])


# Activations a backward needs, by name (`remat='names'`: `jax.checkpoint_policies.save_only_these_names`).
# A frozen layer's backward computes activation gradients only, which need no matmul input: what it
# needs are the attention's q, k, v (its softmax is recomputed from them) and the MLP's pre-activations.
# The projections' outputs that only feed a residual sum (attention out, MLP out) are not kept.
SAVED_ACTIVATIONS = ("attn_q", "attn_k", "attn_v", "mlp_pre_activation", "mlp_up")


def swiglu_mlp(x: Array, gate: Array, up: Array, down: Array, dtype) -> Array:
  """SiLU-gated MLP (Llama). x: [..., D]; gate, up: [D, F]; down: [F, D]."""
  pre = checkpoint_name(matmul(x, gate, dtype), "mlp_pre_activation")
  h = jax.nn.silu(pre) * checkpoint_name(matmul(x, up, dtype), "mlp_up")
  return matmul(h, down, dtype)


# The MLP activations by name: the paper's resampler and xattn FFW ('squared_relu'; IDEFICS's
# resampler: 'relu'), its
# Chinchilla-family LM ('gelu_tanh'), torch's nn.GELU() ('gelu': OpenFlamingo, OpenCLIP's LAION
# towers, the BERT-style text tower) and OpenAI CLIP's 'quick_gelu'.
ACTIVATIONS = {
  "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
  "relu": jax.nn.relu,
  "gelu": lambda x: jax.nn.gelu(x, approximate=False),
  "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
  "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def mlp(x: Array, w_in: Array, w_out: Array, activation: str, dtype) -> Array:
  """Two-layer MLP without biases. x: [..., D]; w_in: [D, F]; w_out: [F, D]; `activation` names one
  of ACTIVATIONS."""
  pre = checkpoint_name(matmul(x, w_in, dtype), "mlp_pre_activation")
  return matmul(ACTIVATIONS[activation](pre), w_out, dtype)


def causal_mask(token_mask: Array) -> Array:
  """[B, T, T] mask: query t sees keys s <= t that are valid tokens. token_mask: [B, T] bool."""
  t = token_mask.shape[1]
  causal = jnp.tril(jnp.ones((t, t), dtype=bool))
  return causal[None] & token_mask[:, None, :]


def positions_from_mask(token_mask: Array, offset: Array | None = None) -> Array:
  """Positions [B, T] counting valid tokens only (left padding gets position 0), plus an offset [B]."""
  pos = jnp.cumsum(token_mask.astype(jnp.int32), axis=1) - 1
  pos = jnp.maximum(pos, 0)
  if offset is not None:
    pos = pos + offset[:, None]
  return pos


def truncated_normal_init(fan_in: int, scale: float = 1.0):
  """Initialiser with std = scale / sqrt(fan_in); works for stacked shapes (fan_in given explicitly)."""
  # 0.8796 is the std of a standard normal truncated at 2 sigma.
  return hk.initializers.TruncatedNormal(stddev=scale / (fan_in**0.5) / 0.87962566)
