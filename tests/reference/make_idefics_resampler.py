"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_idefics_resampler.py OUT_DIR QK_NORMS

Builds transformers' IdeficsPerceiverResampler (vision width 16, 2 layers, 2 heads of 8, 4 latents;
qk_layer_norms_perceiver 0/1) with random weights (LayerNorm scales around 1) and writes
OUT_DIR/tensors.safetensors (as `model.perceiver_resampler.*`), context.npy [B, S, Dv] and
resampled.npy [B, R, Dv].
"""

import os
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers.models.idefics import perceiver as idefics_perceiver

DV, DEPTH, HEADS, HEAD_DIM, LATENTS = 16, 2, 2, 8, 4


def main():
  out, qk = sys.argv[1], sys.argv[2] == "1"
  torch.manual_seed(0)
  config = transformers.IdeficsConfig(
    vision_config={"embed_dim": DV, "image_size": 8, "patch_size": 4},
    perceiver_config={"qk_layer_norms_perceiver": qk},
  )
  perceiver = idefics_perceiver.IdeficsPerceiverResampler(config, DV, DEPTH, HEADS, HEAD_DIM, LATENTS).eval()
  with torch.no_grad():
    for m in perceiver.modules():
      for name, p in m.named_parameters(recurse=False):
        base = 1.0 if isinstance(m, torch.nn.LayerNorm) and name == "weight" else 0.0
        p.copy_(base + 0.3 * torch.randn_like(p))
  context = np.random.default_rng(0).normal(size=(2, 6, DV)).astype(np.float32)
  with torch.no_grad():
    resampled = perceiver(torch.from_numpy(context))
  tensors = {f"model.perceiver_resampler.{k}": v.contiguous() for k, v in perceiver.state_dict().items()}
  save_file(tensors, os.path.join(out, "tensors.safetensors"))
  np.save(os.path.join(out, "context.npy"), context)
  np.save(os.path.join(out, "resampled.npy"), resampled.numpy())


if __name__ == "__main__":
  main()
