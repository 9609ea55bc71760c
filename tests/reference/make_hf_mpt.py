"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_hf_mpt.py OUT_DIR N_HEADS

Builds a tiny transformers `MptForCausalLM` with random weights (N_HEADS heads: a power of two or not,
for ALiBi's two slope rules), saves it with `save_pretrained` (config.json + model.safetensors) in
OUT_DIR/model, and writes OUT_DIR/ids.npy and mask.npy (a batch with left padding), logits.npy (its
logits) and generated.npy (greedy `generate`, with its KV cache, 5 new tokens per row).
"""

import os
import sys

import numpy as np
import torch
import transformers


def main():
  out, n_heads = sys.argv[1], int(sys.argv[2])
  torch.manual_seed(0)
  config = transformers.MptConfig(
    d_model=8 * n_heads,
    n_heads=n_heads,
    n_layers=3,
    expansion_ratio=4,
    max_seq_len=64,
    vocab_size=50,
    attn_config={"alibi": True, "alibi_bias_max": 8},
  )
  model = transformers.MptForCausalLM(config).eval()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm):
        m.weight.copy_(1.0 + 0.3 * torch.randn_like(m.weight))
  model.save_pretrained(os.path.join(out, "model"), safe_serialization=True)
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 50, (2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, :3] = 0  # left padding
  ids[1, :3] = 0
  with torch.no_grad():
    logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    generated = model.generate(
      input_ids=torch.from_numpy(ids),
      attention_mask=torch.from_numpy(mask),
      max_new_tokens=5,
      do_sample=False,
      pad_token_id=0,
    )
  for name, value in dict(
    ids=ids, mask=mask, logits=logits.numpy(), generated=generated[:, 7:].numpy()
  ).items():
    np.save(os.path.join(out, f"{name}.npy"), value)


if __name__ == "__main__":
  main()
