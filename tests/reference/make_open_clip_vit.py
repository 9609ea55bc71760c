"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_open_clip_vit.py OUT_DIR WIDTH LAYERS HEADS PATCH IMAGE_SIZE EMBED_DIM QUICK_GELU

Builds an open_clip CLIP vision tower of that shape with random weights (LayerNorms included, so
that every tensor matters), and writes OUT_DIR/visual.safetensors (the tensors under `visual.`, as a
whole CLIP checkpoint names them), OUT_DIR/images.npy (NHWC in [0, 1]) and OUT_DIR/pooled.npy,
OUT_DIR/tokens.npy: open_clip's outputs for those images after its own CLIP normalisation.
"""

import os
import sys

import numpy as np
import torch
from ref_imports import load
from safetensors.torch import save_file


def main():
  out, width, layers, heads, patch, size, embed, quick = sys.argv[1:]
  width, layers, heads, patch, size, embed = map(int, (width, layers, heads, patch, size, embed))
  transformer, constants = load("open_clip.transformer"), load("open_clip.constants")
  torch.manual_seed(0)
  # As open_clip's `_build_vision_tower` builds a ViT (no attention pooling, class-token pooling).
  visual = transformer.VisionTransformer(
    image_size=size,
    patch_size=patch,
    width=width,
    layers=layers,
    heads=heads,
    mlp_ratio=4.0,
    output_dim=embed,
    act_layer=transformer.QuickGELU if quick == "1" else torch.nn.GELU,
    norm_layer=transformer.LayerNorm,
    output_tokens=True,
  )
  with torch.no_grad():
    for name, p in visual.named_parameters():
      base = 1.0 if name.endswith(("ln_pre.weight", "ln_post.weight", "ln_1.weight", "ln_2.weight")) else 0.0
      p.copy_(base + 0.2 * torch.randn_like(p))
  visual.eval()
  rng = np.random.default_rng(0)
  images = rng.random((3, size, size, 3), dtype=np.float32)
  mean = torch.tensor(constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)
  x = (torch.from_numpy(images).permute(0, 3, 1, 2) - mean) / std
  with torch.no_grad():
    pooled, tokens = visual(x)
  save_file(
    {f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()},
    os.path.join(out, "visual.safetensors"),
  )
  np.save(os.path.join(out, "images.npy"), images)
  np.save(os.path.join(out, "pooled.npy"), pooled.numpy())
  np.save(os.path.join(out, "tokens.npy"), tokens.numpy())


if __name__ == "__main__":
  main()
