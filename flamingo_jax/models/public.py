"""The public Flamingo-family models as size specs (the shape of `flamingo.SIZES` entries).

`flamingo.model_config('openflamingo-9b')` builds them; the converters (`flamingo_jax/convert/`)
describe a converted model by the same dict (`open_flamingo_spec`, `idefics_spec`), so a spec made
from a checkpoint's own files and a preset here are one format. Shapes are the sources' configs:
OpenFlamingo 2.x (`create_model_and_transforms`: ViT-L/14, resampler of 6 layers x 64 latents, 8
heads of 64, blocks with 8 heads of 64 before LM layer l when (l + 1) % n == 0) over MPT; IDEFICS
(`IdeficsConfig` of HuggingFaceM4/idefics-9b and -80b) over LLaMA with a ViT-H/14.

Vocabularies count the LM's own tokens only (the `<image>` and `<EOC>` rows are the two extra
tokens): OpenFlamingo resizes MPT's padded 50,432-row table to the 50,277 tokens of its GPT-NeoX
tokenizer plus its new tokens; IDEFICS keeps LLaMA's 32,000 plus `additional_vocab_size` 2.
"""

from flamingo_jax.models import clip_vit


def mpt_lm(dim: int, num_layers: int, num_heads: int, vocab_size: int = 50277) -> dict:
  """An MPT LM (ALiBi, LayerNorm without bias, exact-GELU MLP of 4 D, tied embeddings)."""
  return dict(
    vocab_size=vocab_size,
    dim=dim,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=dim // num_heads,
    ffw_hidden=4 * dim,
    mlp="gelu_exact",
    norm="layer_nobias",
    norm_eps=1e-5,
    rope_theta=10000.0,
    tie_embeddings=True,
    max_seq_len=2048,
    position="alibi",
    alibi_bias_max=8.0,
  )


def llama_lm(dim: int, num_layers: int, num_heads: int, ffw_hidden: int, norm_eps: float) -> dict:
  """A LLaMA-1 LM (RoPE, RMSNorm, SwiGLU, untied, 32k vocabulary)."""
  return dict(
    vocab_size=32000,
    dim=dim,
    num_layers=num_layers,
    num_heads=num_heads,
    num_kv_heads=num_heads,
    head_dim=dim // num_heads,
    ffw_hidden=ffw_hidden,
    mlp="swiglu",
    norm="rms",
    norm_eps=norm_eps,
    rope_theta=10000.0,
    tie_embeddings=False,
    max_seq_len=2048,
  )


def open_flamingo_spec(
  lm: dict, vision_variant: str, vision_width: int, every: int, depth: int = 6, num_latents: int = 64
) -> dict:
  """OpenFlamingo over `lm`: its resampler (width = the ViT's) and blocks (GELU FFWs, LayerNorm on
  the text only, before LM layer l when (l + 1) % every == 0)."""
  return dict(
    vision_variant=vision_variant,
    image_size=clip_vit.variant(vision_variant).image_size,
    lm=lm,
    xattn=dict(every=every, first=every - 1, num_heads=8, head_dim=64, ffw_mult=4, ffw_activation="gelu"),
    resampler=dict(
      dim=vision_width,
      depth=depth,
      num_latents=num_latents,
      num_heads=8,
      head_dim=64,
      ffw_mult=4,
      max_frames=1,
      ffw_activation="gelu",
    ),
  )


def idefics_spec(
  lm: dict,
  *,
  every: int,
  qk_norm: bool,
  vector_gates: bool,
  resampler_heads: int,
  resampler_head_dim: int,
  resampler_qk_norm: bool,
  vision_variant: str = "ViT-H/14-idefics",
  vision_width: int = 1280,
  depth: int = 6,
  num_latents: int = 64,
) -> dict:
  """IDEFICS over `lm`: blocks before layers 0, every, 2 every, ... with q/k/v/o at the LM's width,
  RMSNorm, a SwiGLU FFW of the LM's intermediate width; its resampler (ReLU MLP of 4 Dv)."""
  return dict(
    vision_variant=vision_variant,
    image_size=clip_vit.variant(vision_variant).image_size,
    lm=lm,
    xattn=dict(
      every=every,
      first=0,
      num_heads=lm["num_heads"],
      head_dim=lm["head_dim"],
      ffw_mult=4,
      norm="rms",
      norm_eps=lm["norm_eps"],
      ffw="swiglu",
      ffw_hidden=lm["ffw_hidden"],
      qk_norm=qk_norm,
      gate_shape="vector" if vector_gates else "scalar",
      media_reset="eos",
    ),
    resampler=dict(
      dim=vision_width,
      depth=depth,
      num_latents=num_latents,
      num_heads=resampler_heads,
      head_dim=resampler_head_dim,
      ffw_mult=4,
      max_frames=1,
      ffw_activation="relu",
      qk_norm=resampler_qk_norm,
    ),
  )


_IDEFICS = dict(vector_gates=False, resampler_heads=16, resampler_head_dim=96, resampler_qk_norm=True)

SIZES = {
  # openflamingo/OpenFlamingo-3B-vitl-mpt1b: MPT-1B (RedPajama 200B), a block before every layer.
  "openflamingo-3b": open_flamingo_spec(mpt_lm(2048, 24, 16), "ViT-L/14", 1024, every=1),
  # openflamingo/OpenFlamingo-9B-vitl-mpt7b: MPT-7B, a block before every fourth layer.
  "openflamingo-9b": open_flamingo_spec(mpt_lm(4096, 32, 32), "ViT-L/14", 1024, every=4),
  # HuggingFaceM4/idefics-9b: LLaMA-7B.
  "idefics-9b": idefics_spec(llama_lm(4096, 32, 32, 11008, 1e-6), every=4, qk_norm=False, **_IDEFICS),
  # HuggingFaceM4/idefics-80b: LLaMA-65B, qk layer norms.
  "idefics-80b": idefics_spec(llama_lm(8192, 80, 64, 22016, 1e-5), every=4, qk_norm=True, **_IDEFICS),
}
