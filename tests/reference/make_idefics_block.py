"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_idefics_block.py OUT_DIR ALPHA_TYPE QK_NORMS

Builds transformers' IdeficsGatedCrossAttentionLayer from a tiny IdeficsConfig (alpha_type 'float' or
'vector', qk_layer_norms 0/1) with random weights (norms around 1, alphas random), and writes
OUT_DIR/tensors.safetensors (as `model.gated_cross_attn_layers.0.*`), and as .npy: x [B, T, D], the
image tokens [B, N*R, Dv], phi [B, T] (the image each token sees, -1 none) and the block's output
[B, T, D] for IDEFICS's additive image mask and cross-attention gate built from phi.
"""

import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file

D, HEADS, F, DV, N, R = 32, 4, 48, 16, 3, 4


def main():
  out, alpha_type, qk = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
  torch.manual_seed(0)
  config = transformers.IdeficsConfig(
    hidden_size=D,
    num_attention_heads=HEADS,
    intermediate_size=F,
    num_hidden_layers=2,
    vocab_size=50,
    qk_layer_norms=qk,
    alpha_type=alpha_type,
    alpha_initializer="zeros",  # then drawn below ('normal' fails for float alphas in transformers)
    vision_config={
      "embed_dim": DV,
      "image_size": 8,
      "patch_size": 4,
      "num_hidden_layers": 1,
      "num_attention_heads": 2,
      "intermediate_size": 32,
    },
  )
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  layer = transformers.models.idefics.modeling_idefics.IdeficsGatedCrossAttentionLayer(
    config, layer_idx=0
  ).eval()
  with torch.no_grad():
    for name, p in layer.named_parameters():
      base = 1.0 if "layernorm" in name or "layer_norm" in name else 0.0
      p.copy_(base + (0.5 if name.startswith("alpha") else 0.3) * torch.randn_like(p))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 7, D)).astype(np.float32)
  images = rng.normal(size=(2, N * R, DV)).astype(np.float32)
  phi = np.array([[-1, 0, 0, 1, 1, 2, 2], [-1, -1, 0, 0, 0, 1, 1]], np.int32)  # tokens before any image
  allowed = phi[:, :, None] == np.repeat(np.arange(N), R)[None, None, :]
  mask = np.where(allowed, 0.0, torch.finfo(torch.float32).min).astype(np.float32)[:, None]
  gate = (phi >= 0).astype(np.int64)
  with torch.no_grad():
    y = layer(
      torch.from_numpy(x),
      image_hidden_states=torch.from_numpy(images),
      image_attention_mask=torch.from_numpy(mask),
      cross_attention_gate=torch.from_numpy(gate),
    )
  y = y[0] if isinstance(y, tuple) else y
  save_file(
    {f"model.gated_cross_attn_layers.0.{k}": v.contiguous() for k, v in layer.state_dict().items()},
    os.path.join(out, "tensors.safetensors"),
  )
  for name, value in dict(x=x, images=images, phi=phi, y=y.numpy()).items():
    np.save(os.path.join(out, f"{name}.npy"), value)


if __name__ == "__main__":
  main()
