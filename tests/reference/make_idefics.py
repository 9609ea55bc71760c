"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_idefics.py OUT_DIR QK_NORMS ALPHA_TYPE [TOKENIZER_DIR]

Builds a tiny transformers `IdeficsForVisionText2Text` from an `IdeficsConfig` (a LLaMA of 4 layers,
a block before every second layer, qk layer norms 0/1, 'float' or 'vector' alphas; a CLIP ViT of the
`ViT-test-idefics` shape; a resampler with qk layer norms) with random weights, saves it with
`save_pretrained` (config.json + model.safetensors) in OUT_DIR/model, and writes as .npy: images
[B, N, H, W, 3] in [0, 1]; ids / mask [B, T] (left padding, text before the first image; `<image>`
= V + 1, `<fake_token_around_image>` = V around it, as IDEFICS's prompts have them) with logits
[B, T, V + 2] for the image attention mask of IDEFICS's processor (an EOS inside the first row);
generated [B, 5] (greedy). With TOKENIZER_DIR (tokenizer.json + tokenizer_config.json), the LM's
original vocabulary is that tokenizer's and both files go into OUT_DIR/model, as in a real IDEFICS
directory.
"""

import os
import shutil
import sys
import types

import numpy as np
import tokenizers
import torch
import transformers
from transformers.models.idefics import processing_idefics

V, T, NEW = 40, 14, 5
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


EOS = 2


def prompts(rng):
  """Each row: text, <fake><image><fake>, text, <fake><image><fake>, text; the first row ends its
  first chunk with an EOS (IDEFICS's processor: the tokens after it see no image until the next)."""
  rows = []
  for length in (T, T - 3):
    ids = list(rng.integers(3, V, length))
    for at in (2, length // 2 + 1):
      ids[at - 1 : at + 2] = [V, V + 1, V]
    rows.append(ids)
  rows[0][T // 2 - 2] = EOS
  return rows


def main():
  global V  # the tokenizer's vocabulary, when one is given
  out, qk, alpha = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
  tokenizer_dir = sys.argv[4] if len(sys.argv) > 4 else ""
  if tokenizer_dir:
    V = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
  torch.manual_seed(0)
  config = transformers.IdeficsConfig(
    hidden_size=32,
    num_attention_heads=4,
    intermediate_size=48,
    num_hidden_layers=4,
    vocab_size=V,
    additional_vocab_size=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    cross_layer_interval=2,
    qk_layer_norms=qk,
    alpha_type=alpha,
    alpha_initializer="zeros",  # then drawn below
    tie_word_embeddings=False,
    use_resampler=True,
    vision_config={
      "embed_dim": 32,
      "image_size": 32,
      "patch_size": 8,
      "num_hidden_layers": 2,
      "num_attention_heads": 2,
      "intermediate_size": 128,
      "hidden_act": "gelu",
    },
    perceiver_config={
      "resampler_depth": 2,
      "resampler_n_heads": 2,
      "resampler_head_dim": 8,
      "resampler_n_latents": 4,
      "qk_layer_norms_perceiver": True,
    },
  )
  config._attn_implementation = "eager"  # pylint: disable=protected-access
  model = transformers.IdeficsForVisionText2Text(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      is_scale = ("norm" in name or "layrnorm" in name) and name.endswith("weight")
      p.copy_((1.0 if is_scale else 0.0) + (0.5 if ".alpha" in name else 0.2) * torch.randn_like(p))
  model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir else ():
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, "model", name))

  rng = np.random.default_rng(0)
  images = rng.random((2, 2, 32, 32, 3), dtype=np.float32)
  pixels = (torch.from_numpy(images) - torch.tensor(MEAN)) / torch.tensor(STD)
  pixels = pixels.permute(0, 1, 4, 2, 3).contiguous()  # [B, N, 3, H, W]
  rows = prompts(rng)
  ids = np.array([[0] * (T - len(r)) + r for r in rows])
  mask = np.array([[0] * (T - len(r)) + [1] * len(r) for r in rows])
  tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda token: V + 1, eos_token_id=EOS)
  index, _ = processing_idefics.image_attention_mask_for_packed_input_ids_pt(torch.from_numpy(ids), tokenizer)
  image_mask = processing_idefics.incremental_to_binary_attention_mask(
    index, return_tensors="pt", num_classes=2
  )
  inputs = dict(
    input_ids=torch.from_numpy(ids),
    attention_mask=torch.from_numpy(mask),
    pixel_values=pixels,
    image_attention_mask=image_mask,
  )
  with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(
      **inputs, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, suppress_tokens=[V + 1]
    )
  for name, value in dict(
    images=images, ids=ids, mask=mask, logits=logits.numpy(), generated=generated[:, T:].numpy()
  ).items():
    np.save(os.path.join(out, f"{name}.npy"), value)


if __name__ == "__main__":
  main()
