"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python make_open_flamingo.py OUT_DIR LM EVERY [TOKENIZER_DIR]      (LM: llama | mpt)

Builds a whole tiny OpenFlamingo as `open_flamingo.create_model_and_transforms` does, from random
weights: a transformers LM (LlamaForCausalLM, untied; or MptForCausalLM, ALiBi, tied), the
FlamingoLMMixin with a GATED XATTN-DENSE block before layer l when (l + 1) % EVERY == 0, the
token rows of `<|endofchunk|>`, `<image>` and `<PAD>` appended (ids V, V+1, V+2), OpenFlamingo's
resampler, and a random open_clip ViT (the `ViT-test` shape). Writes, in the sources' own formats:
  OUT_DIR/lm/            the LM before Flamingo touched it (`save_pretrained`: config + safetensors)
  OUT_DIR/visual.safetensors   the vision tower (`visual.*`, as open_clip names it)
  OUT_DIR/checkpoint.pt  the Flamingo state dict without the vision tower (`torch.save`), and the
                         same tensors as OUT_DIR/checkpoint.safetensors
and the check's data as .npy: images [B, 2, H, W, 3] in [0, 1]; ids / mask [B, T] (right padding;
text before the first image) with logits [B, T, V+3]; gen_ids / gen_mask (the same prompts,
left-padded, as `generate` wants them) with generated [B, 5] (greedy, KV cache).
With TOKENIZER_DIR (tokenizer.json + tokenizer_config.json), the LM's vocabulary is that
tokenizer's and both files go into OUT_DIR/lm, as a real LM directory holds them.
"""

import os
import shutil
import sys
import types

import numpy as np
import tokenizers
import torch
import transformers
from ref_imports import load
from safetensors.torch import save_file

V, T, NEW = 40, 12, 5  # original vocabulary (without a tokenizer), prompt length, generated tokens


def randomise(module: torch.nn.Module, scale: float = 0.3) -> None:
  """Every parameter random: norm scales around 1, the rest (gates included) around 0."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      is_scale = name.endswith("weight") and p.ndim == 1
      p.copy_((1.0 if is_scale else 0.0) + scale * torch.randn_like(p))


def make_lm(kind: str) -> transformers.PreTrainedModel:
  if kind == "llama":
    config = transformers.LlamaConfig(
      vocab_size=V,
      hidden_size=32,
      intermediate_size=64,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      tie_word_embeddings=False,
      rms_norm_eps=1e-5,
    )
    return transformers.LlamaForCausalLM(config).eval()
  config = transformers.MptConfig(
    d_model=32,
    n_heads=4,
    n_layers=4,
    expansion_ratio=4,
    max_seq_len=64,
    vocab_size=V,
    attn_config={"alibi": True, "alibi_bias_max": 8},
  )
  return transformers.MptForCausalLM(config).eval()


def vision_tower():
  transformer = load("open_clip.transformer")
  visual = transformer.VisionTransformer(
    image_size=32,
    patch_size=8,
    width=32,
    layers=2,
    heads=2,
    mlp_ratio=4.0,
    output_dim=24,
    act_layer=transformer.QuickGELU,
    norm_layer=transformer.LayerNorm,
    output_tokens=True,
  )
  randomise(visual, 0.2)
  return visual.eval()


def prompts(rng):
  """Two rows, each: text, <image>, text, <image>, text (ids V+1 = <image>; V = <|endofchunk|>)."""
  rows = []
  for length in (T, T - 3):
    ids = list(rng.integers(0, V, length))
    ids[2], ids[length // 2 + 1] = V + 1, V + 1
    ids[length // 2] = V  # an <|endofchunk|> closes the first chunk
    rows.append(ids)
  return rows


def main():
  global V  # pylint: disable=global-statement  (the vocabulary of TOKENIZER_DIR)
  out, kind, every = sys.argv[1], sys.argv[2], int(sys.argv[3])
  tokenizer_dir = sys.argv[4] if len(sys.argv) > 4 else ""
  if tokenizer_dir:
    V = tokenizers.Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json")).get_vocab_size()
  torch.manual_seed(0)
  flamingo_lib = load("open_flamingo.src.flamingo")
  mixin = load("open_flamingo.src.flamingo_lm").FlamingoLMMixin
  utils = load("open_flamingo.src.utils")
  constants = load("open_clip.constants")

  lm = make_lm(kind)
  randomise(lm, 0.2)
  lm.save_pretrained(os.path.join(out, "lm"), safe_serialization=True)
  for name in ("tokenizer.json", "tokenizer_config.json") if tokenizer_dir else ():
    shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(out, "lm", name))
  visual = vision_tower()
  save_file(
    {f"visual.{k}": v.contiguous() for k, v in visual.state_dict().items()}, f"{out}/visual.safetensors"
  )

  # As create_model_and_transforms: the mixin, the decoder layers' name, three new token rows.
  utils.extend_instance(lm, mixin)
  lm.set_decoder_layers_attr_name("model.layers" if kind == "llama" else "transformer.blocks")
  lm.resize_token_embeddings(V + 3)
  model = flamingo_lib.Flamingo(
    types.SimpleNamespace(visual=visual), lm, V, V + 1, vis_dim=32, cross_attn_every_n_layers=every
  ).eval()
  randomise(model.perceiver)
  randomise(model.lang_encoder.gated_cross_attn_layers)
  with torch.no_grad():  # the new rows, trained in OpenFlamingo (input side; output side when untied)
    for emb in {id(e): e for e in (lm.get_input_embeddings(), lm.get_output_embeddings())}.values():
      emb.weight[V:] = 0.3 * torch.randn_like(emb.weight[V:])
  state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
  torch.save(state, os.path.join(out, "checkpoint.pt"))
  # The same tensors as safetensors (which holds no shared storage), for an interpreter without torch.
  save_file(
    {k: v.clone().contiguous() for k, v in state.items()}, os.path.join(out, "checkpoint.safetensors")
  )

  rng = np.random.default_rng(0)
  images = rng.random((2, 2, 32, 32, 3), dtype=np.float32)
  mean = torch.tensor(constants.OPENAI_DATASET_MEAN).view(1, 1, 1, 3, 1, 1)
  std = torch.tensor(constants.OPENAI_DATASET_STD).view(1, 1, 1, 3, 1, 1)
  vision_x = (torch.from_numpy(images).permute(0, 1, 4, 2, 3)[:, :, None] - mean) / std
  rows = prompts(rng)
  pad = V + 2
  ids = np.array([r + [pad] * (T - len(r)) for r in rows])
  mask = np.array([[1] * len(r) + [0] * (T - len(r)) for r in rows])
  gen_ids = np.array([[pad] * (T - len(r)) + r for r in rows])
  gen_mask = np.array([[0] * (T - len(r)) + [1] * len(r) for r in rows])
  with torch.no_grad():
    logits = model(vision_x, torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
    generated = model.generate(
      vision_x,
      torch.from_numpy(gen_ids),
      attention_mask=torch.from_numpy(gen_mask),
      max_new_tokens=NEW,
      min_new_tokens=NEW,
      do_sample=False,
      num_beams=1,
      suppress_tokens=[V + 1, V + 2],  # never <image> (it would start a new image) nor <PAD>
      pad_token_id=pad,
    )
  for name, value in dict(
    images=images,
    ids=ids,
    mask=mask,
    logits=logits.numpy(),
    gen_ids=gen_ids,
    gen_mask=gen_mask,
    generated=generated[:, T:].numpy(),
  ).items():
    np.save(os.path.join(out, f"{name}.npy"), value)


if __name__ == "__main__":
  main()
