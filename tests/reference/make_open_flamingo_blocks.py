"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_open_flamingo_blocks.py OUT_DIR

Builds OpenFlamingo's PerceiverResampler and GatedCrossAttentionBlock (open_flamingo.src.helpers)
with random weights (LayerNorms and gates included) and writes OUT_DIR/tensors.safetensors (the
resampler as `perceiver.*`, the block as `gated_cross_attn_layers.0.*`, as OpenFlamingo names them),
and the inputs and outputs as .npy: features [B, N, F, V, Dv] -> resampled [B, N, R, Dv]; text x
[B, T, D] with media_locations bool [B, T] (tokens before the first image included) and media
[B, N, R, Dv] -> the block's output [B, T, D].
"""

import os
import sys

import numpy as np
import torch
from ref_imports import load
from safetensors.torch import save_file

DV, D, HEADS, DIM_HEAD, LATENTS, DEPTH = 16, 24, 2, 8, 4, 2


def randomise(module: torch.nn.Module) -> None:
  """Every parameter random: LayerNorm scales around 1, the rest (gates included) around 0."""
  with torch.no_grad():
    for m in module.modules():
      for name, p in m.named_parameters(recurse=False):
        base = 1.0 if isinstance(m, torch.nn.LayerNorm) and name == "weight" else 0.0
        p.copy_(base + 0.3 * torch.randn_like(p))


def main():
  out = sys.argv[1]
  helpers = load("open_flamingo.src.helpers")
  torch.manual_seed(0)
  resampler = helpers.PerceiverResampler(
    dim=DV, depth=DEPTH, dim_head=DIM_HEAD, heads=HEADS, num_latents=LATENTS
  )
  block = helpers.GatedCrossAttentionBlock(dim=D, dim_visual=DV, dim_head=DIM_HEAD, heads=HEADS)
  randomise(resampler)
  randomise(block)
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 3, 1, 5, DV)).astype(np.float32)
  x = rng.normal(size=(2, 9, D)).astype(np.float32)
  locations = np.zeros((2, 9), bool)
  locations[0, [2, 5, 7]] = True  # two text tokens before the first image
  locations[1, [0, 4]] = True  # the second row has only two of the three images
  with torch.no_grad():
    media = resampler(torch.from_numpy(features))
    y = block(torch.from_numpy(x), media, media_locations=torch.from_numpy(locations))
  tensors = {f"perceiver.{k}": v for k, v in resampler.state_dict().items()}
  tensors.update({f"gated_cross_attn_layers.0.{k}": v for k, v in block.state_dict().items()})
  save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "tensors.safetensors"))
  for name, value in dict(
    features=features, media=media.numpy(), x=x, locations=locations, y=y.numpy()
  ).items():
    np.save(os.path.join(out, f"{name}.npy"), value)


if __name__ == "__main__":
  main()
