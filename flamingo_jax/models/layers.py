"""Pure building blocks shared by the language model, cross-attention and resampler.

Shapes: B batch, T query length, S key length, H heads (Hq query heads, Hkv key/value heads), dh head dim,
D model width, F hidden width.

Numerics: every matmul takes its inputs in the compute dtype (bf16 or fp32) and accumulates in fp32
(`preferred_element_type`), which is also the fast path of XLA on CPUs with AMX. Norms, softmax and the
residual stream stay in fp32.
"""

import functools
import math
import string
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


def einsum(spec: str, a: Array, b: Array, dtype) -> Array:
  """`jnp.einsum(spec, a, b)` with both inputs cast to `dtype`, fp32 accumulation and result.

  In half precision the backward's two products also take half inputs: the fp32 cotangent is rounded
  to `dtype` once, as mixed-precision training does. JAX's own transpose would multiply the fp32
  cotangent by the half operand, which XLA runs as an fp32 product after converting that operand to
  fp32 (every frozen weight, every step): the backward at fp32 speed. `spec` is a contraction of two
  operands whose every index appears in the other operand or the result, so each gradient is one einsum.
  """
  if jnp.dtype(dtype) == jnp.float32:
    return _contract(spec, a.astype(dtype), b.astype(dtype))
  return _half_einsum(spec, jnp.dtype(dtype), a.dtype, b.dtype, a, b)


def _contract(spec: str, a: Array, b: Array) -> Array:
  return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


# A backward product whose result has fewer rows or columns than this (the gradient of the two trainable
# <image>/<EOC> rows: 2 columns) is memory-bound and takes fp32 inputs: XLA:CPU runs such thin products
# with a fallback kernel that has no bf16 x bf16 -> fp32 form.
_HALF_PRODUCT_MIN_SIDE = 16


def _explicit(spec: str, a: Array, b: Array) -> str:
  """`spec` with its `...` spelt out in letters it does not use (the operands' leading axes)."""
  if "..." not in spec:
    return spec
  inputs, out = spec.split("->")
  spec_a, spec_b = inputs.split(",")
  spare = [c for c in string.ascii_letters if c not in spec]
  counts = {s: x.ndim - len(s) + 3 for s, x in ((spec_a, a), (spec_b, b)) if "..." in s}
  leading = "".join(spare[: max(counts.values())])
  fill = lambda s, n: s.replace("...", leading[len(leading) - n :])
  return (
    f"{fill(spec_a, counts.get(spec_a, 0))},{fill(spec_b, counts.get(spec_b, 0))}->{fill(out, len(leading))}"
  )


def _backward_product(spec: str, x: Array, y: Array, dtype) -> Array:
  """One product of the backward (explicit `spec`): half inputs unless its result is thin."""
  (spec_x, spec_y), out = spec.split("->")[0].split(","), spec.split("->")[1]
  size = dict(zip(spec_x, x.shape)) | dict(zip(spec_y, y.shape))
  rows = math.prod(size[c] for c in spec_x if c in out and c not in spec_y)
  cols = math.prod(size[c] for c in spec_y if c in out and c not in spec_x)
  compute = jnp.float32 if min(rows, cols) < _HALF_PRODUCT_MIN_SIDE else dtype
  return _contract(spec, x.astype(compute), y.astype(compute))


def _cast(x: Array, dtype) -> Array:
  """`x` in `dtype`, and `x` itself when it already is: no op, so no second value for the backward."""
  return x if x.dtype == dtype else x.astype(dtype)


# a_dtype, b_dtype: the operands' own dtypes, in which the cotangents must come back.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _half_einsum(spec, dtype, a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  return _contract(spec, _cast(a, dtype), _cast(b, dtype))


def _half_einsum_fwd(spec, dtype, a_dtype, b_dtype, a, b):
  del a_dtype, b_dtype
  a_half, b_half = _cast(a, dtype), _cast(b, dtype)
  return _contract(spec, a_half, b_half), (a_half, b_half)


def _half_einsum_bwd(spec, dtype, a_dtype, b_dtype, residuals, g):
  a_half, b_half = residuals
  inputs, out = _explicit(spec, a_half, b_half).split("->")
  spec_a, spec_b = inputs.split(",")
  grad_a = _backward_product(f"{out},{spec_b}->{spec_a}", g, b_half, dtype).astype(a_dtype)
  grad_b = _backward_product(f"{spec_a},{out}->{spec_b}", a_half, g, dtype).astype(b_dtype)
  return grad_a, grad_b


_half_einsum.defvjp(_half_einsum_fwd, _half_einsum_bwd)


def matmul(x: Array, w: Array, dtype) -> Array:
  """`x @ w` over the last axis of x, inputs cast to `dtype`, fp32 result (`einsum`'s backward)."""
  return einsum("...i,io->...o", x, w, dtype)


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
  q = q.reshape(b, t, hkv, groups, dh)
  logits = einsum("btkgd,bskd->bkgts", q, k, dtype)
  logits = logits * (dh**-0.5)
  if bias is not None:
    logits = logits + bias.reshape(b, hkv, groups, t, bias.shape[-1])
  allowed = mask[:, None, None, :, :]
  logits = jnp.where(allowed, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(any_allowed[:, None, None, :, None] & allowed, probs, 0.0)
  out = einsum("bkgts,bskd->btkgd", probs, v, dtype)
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
