"""An independent plain-numpy (float64) forward of a Llama-family decoder, used as the reference.

It shares no code with the project: it reads tensors under their source names and layouts, and
applies RoPE the way each source expects it:
- 'gguf': llama.cpp tensor names (`blk.{i}.attn_q.weight`, ...) as stored, i.e. with q/k rows in
  llama.cpp's order, rotated in llama.cpp's interleaved layout (pairs (2j, 2j+1) of each head);
- 'hf': HF names (`model.layers.{i}.self_attn.q_proj.weight`, ...), rotate-half layout (pairs
  (j, j + dh/2)).
Matrices are `[out, in]` in both (`y = x @ W.T`). Shapes: T tokens, D width, dh head dim.
"""

import numpy as np

_NAMES = {
  "gguf": {
    "embed": "token_embd.weight",
    "final_norm": "output_norm.weight",
    "output": "output.weight",
    "attn_norm": "blk.{i}.attn_norm.weight",
    "q": "blk.{i}.attn_q.weight",
    "k": "blk.{i}.attn_k.weight",
    "v": "blk.{i}.attn_v.weight",
    "o": "blk.{i}.attn_output.weight",
    "mlp_norm": "blk.{i}.ffn_norm.weight",
    "gate": "blk.{i}.ffn_gate.weight",
    "up": "blk.{i}.ffn_up.weight",
    "down": "blk.{i}.ffn_down.weight",
  },
  "hf": {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "output": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
  },
}


def _rms_norm(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _angles(t, dh, theta):
  """cos, sin [T, 1, dh/2]: pair j turns by position * theta^(-2j/dh)."""
  inv_freq = theta ** (-np.arange(0, dh, 2, dtype=np.float64) / dh)
  ang = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None]
  return np.cos(ang)[:, None], np.sin(ang)[:, None]


def rope_interleaved(x, theta):
  """llama.cpp (LLAMA_ROPE_TYPE_NORM): rotates features (2j, 2j+1). x: [T, H, dh]."""
  cos, sin = _angles(x.shape[0], x.shape[-1], theta)
  x0, x1 = x[..., 0::2], x[..., 1::2]
  out = np.empty_like(x)
  out[..., 0::2] = x0 * cos - x1 * sin
  out[..., 1::2] = x0 * sin + x1 * cos
  return out


def rope_half(x, theta):
  """HF Llama `rotate_half`: rotates features (j, j + dh/2). x: [T, H, dh]."""
  cos, sin = _angles(x.shape[0], x.shape[-1], theta)
  half = x.shape[-1] // 2
  x0, x1 = x[..., :half], x[..., half:]
  return np.concatenate([x0 * cos - x1 * sin, x1 * cos + x0 * sin], axis=-1)


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _attention(q, k, v, group):
  """Causal GQA of one sequence. q: [T, Hq, dh]; k, v: [T, Hkv, dh]. Returns [T, Hq*dh]."""
  t, num_heads, head_dim = q.shape
  causal = np.tril(np.ones((t, t), dtype=bool))
  heads = []
  for hq in range(num_heads):
    kv = hq // group  # Query head hq reads key/value head hq // (Hq / Hkv).
    s = q[:, hq] @ k[:, kv].T / np.sqrt(head_dim)  # [T, T]
    s = np.where(causal, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    heads.append(p @ v[:, kv])
  return np.concatenate(heads, axis=-1)


def forward_batch(
  tensors, sequences, *, layout, num_layers, num_heads, num_kv_heads, head_dim, norm_eps, rope_theta
):
  """Logits [T_b, V] (float64) of each token sequence [T_b] (positions 0..T_b-1, causal).

  The sequences are packed along the token axis for the dense layers (one weight read per
  layer); RoPE and attention run per sequence.

  Args:
    tensors: `{source name: array [out, in] / [D]}` ('output' absent = tied embeddings).
    sequences: a list of 1-D token id sequences (any lengths).
    layout: 'gguf' or 'hf' (names and RoPE layout, see the module docstring).
  """
  names = _NAMES[layout]
  rope = rope_interleaved if layout == "gguf" else rope_half

  def get(key, i=None):
    name = names[key] if i is None else names[key].format(i=i)
    return np.asarray(tensors[name], dtype=np.float64)

  sequences = [np.asarray(s) for s in sequences]
  bounds = np.cumsum([0] + [len(s) for s in sequences])
  segments = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
  embed = get("embed")
  x = embed[np.concatenate(sequences)]  # [sum T, D]
  group = num_heads // num_kv_heads
  for i in range(num_layers):
    h = _rms_norm(x, get("attn_norm", i), norm_eps)
    q_all, k_all, v_all = h @ get("q", i).T, h @ get("k", i).T, h @ get("v", i).T
    attn = []
    for seg in segments:
      t = seg.stop - seg.start
      q = rope(q_all[seg].reshape(t, num_heads, head_dim), rope_theta)
      k = rope(k_all[seg].reshape(t, num_kv_heads, head_dim), rope_theta)
      attn.append(_attention(q, k, v_all[seg].reshape(t, num_kv_heads, head_dim), group))
    x = x + np.concatenate(attn) @ get("o", i).T
    h = _rms_norm(x, get("mlp_norm", i), norm_eps)
    x = x + (_silu(h @ get("gate", i).T) * (h @ get("up", i).T)) @ get("down", i).T
  out = get("output") if names["output"] in tensors else embed
  logits = _rms_norm(x, get("final_norm"), norm_eps) @ out.T
  return [logits[seg] for seg in segments]


def forward(tensors, tokens, **kwargs):
  """Logits [T, V] (float64) of one sequence `tokens` [T]; see `forward_batch`."""
  return forward_batch(tensors, [tokens], **kwargs)[0]
