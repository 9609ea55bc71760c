"""OpenCLIP / OpenAI CLIP vision towers -> the project's `ClipViT` params (`models/clip_vit.py`).

Source: an open_clip state dict, as safetensors (`open_clip_model.safetensors`) or a `.pt` / `.bin`
file (`state_dict.read_state_dict`). The vision tower's tensors are those under `visual.` (a whole CLIP model; the text
tower is ignored) or, when no name has that prefix, all of them (a vision tower saved alone).

Shapes: D width, F MLP width, E output width, p patch, P = (S / p)^2 patches, L layers.
"""

import numpy as np

from flamingo_jax.convert import names, state_dict
from flamingo_jax.models import clip_vit

PREFIX = "visual."
_BLOCK = "transformer.resblocks.{i}."
_LAYERS = "vision_encoder/layers/block"
E = names.Entry

# torch's nn.MultiheadAttention fuses q, k, v in `in_proj_weight` [3D, D] (rows q, then k, then v);
# the project keeps them apart ([D, D] each, `x @ w`): split_j takes rows j*D..(j+1)*D, transposed.
TABLE = (
  # Conv2d [D, 3, p, p] (OIHW) -> HWIO [p, p, 3, D], lax's layout for NHWC images.
  E("conv1.weight", "vision_encoder/patch_embed", "w", "conv", ("p", "p", "C", "D")),
  E("class_embedding", "vision_encoder", "class_embedding", "copy", ("D",)),
  E("positional_embedding", "vision_encoder", "positional_embedding", "copy", ("T", "D")),
  E("ln_pre.weight", "vision_encoder/ln_pre", "scale", "copy", ("D",)),
  E("ln_pre.bias", "vision_encoder/ln_pre", "bias", "copy", ("D",)),
  E(_BLOCK + "ln_1.weight", _LAYERS, "attn_norm_scale", "copy", ("D",)),
  E(_BLOCK + "ln_1.bias", _LAYERS, "attn_norm_bias", "copy", ("D",)),
  *(
    E(_BLOCK + "attn.in_proj_weight", _LAYERS, n, f"split_{j}", ("D", "D"), source_shape=("3D", "D"))
    for j, n in enumerate("qkv")
  ),
  *(
    E(_BLOCK + "attn.in_proj_bias", _LAYERS, f"{n}_bias", f"split_{j}", ("D",), source_shape=("3D",))
    for j, n in enumerate("qkv")
  ),
  # nn.Linear weights are [out, in]; the project multiplies `x @ w` ([in, out]).
  E(_BLOCK + "attn.out_proj.weight", _LAYERS, "o", "transpose", ("D", "D")),
  E(_BLOCK + "attn.out_proj.bias", _LAYERS, "o_bias", "copy", ("D",)),
  E(_BLOCK + "ln_2.weight", _LAYERS, "mlp_norm_scale", "copy", ("D",)),
  E(_BLOCK + "ln_2.bias", _LAYERS, "mlp_norm_bias", "copy", ("D",)),
  E(_BLOCK + "mlp.c_fc.weight", _LAYERS, "mlp_in", "transpose", ("D", "F")),
  E(_BLOCK + "mlp.c_fc.bias", _LAYERS, "mlp_in_bias", "copy", ("F",)),
  E(_BLOCK + "mlp.c_proj.weight", _LAYERS, "mlp_out", "transpose", ("F", "D")),
  E(_BLOCK + "mlp.c_proj.bias", _LAYERS, "mlp_out_bias", "copy", ("D",)),
  E("ln_post.weight", "vision_encoder/ln_post", "scale", "copy", ("D",)),
  E("ln_post.bias", "vision_encoder/ln_post", "bias", "copy", ("D",)),
  # open_clip applies `pooled @ proj`: already [in, out].
  E("proj", "vision_encoder", "proj", "copy", ("D", "E")),
)


def letters(v: clip_vit.ViTVariant) -> dict[str, int]:
  """The shape letters of TABLE for a variant."""
  g = v.image_size // v.patch
  return {
    "D": v.width,
    "3D": 3 * v.width,
    "F": v.mlp_dim,
    "E": v.embed_dim,
    "p": v.patch,
    "C": 3,
    "T": 1 + g * g,
  }


def vision_tensors(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The vision tower's tensors, named without the `visual.` prefix."""
  if any(k.startswith(PREFIX) for k in state):
    return {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
  return state


def convert_vision(
  state: dict[str, np.ndarray], variant_name: str, dtype=np.float32, source: str = ""
) -> dict:
  """open_clip vision tensors -> {module: {name: array}} of `ClipViT(variant_name)`.

  Raises KeyError for a missing or unmapped tensor and ValueError for a mis-shaped one (named).
  """
  v = clip_vit.variant(variant_name)
  tensors = vision_tensors(state)
  return names.convert_tensors(
    TABLE, tensors, num_layers=v.layers, letters=letters(v), dtype=dtype, source=source
  )


def load_open_clip_vision(path: str, variant_name: str, dtype=np.float32) -> dict:
  """`convert_vision` of the file at `path`."""
  return convert_vision(state_dict.read_state_dict(path), variant_name, dtype, source=path)
