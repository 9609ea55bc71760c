"""`ClipViT` + the open_clip converter against open_clip itself (random weights, fp32)."""

import haiku as hk
import jax
import numpy as np
import pytest

from flamingo_jax.convert import open_clip_vit, state_dict
from flamingo_jax.models import clip_vit

# (width, layers, heads, patch, image size, embed dim, quick_gelu): OpenAI's and LAION's activations.
SHAPES = {"quick_gelu": (32, 2, 2, 8, 32, 24, 1), "gelu": (48, 3, 4, 4, 16, 16, 0)}


@pytest.mark.parametrize("activation", sorted(SHAPES))
def test_outputs_match_open_clip(run_reference, tmp_path, monkeypatch, activation):
  width, layers, heads, patch, size, embed, quick = SHAPES[activation]
  run_reference("make_open_clip_vit.py", tmp_path, width, layers, heads, patch, size, embed, quick)
  variant = clip_vit.ViTVariant(size, patch, width, layers, heads, 4 * width, embed, activation)
  monkeypatch.setitem(clip_vit.VARIANTS, "ViT-ref", variant)
  params = open_clip_vit.load_open_clip_vision(str(tmp_path / "visual.safetensors"), "ViT-ref")
  model = hk.without_apply_rng(hk.transform(lambda x: clip_vit.ClipViT("ViT-ref")(x)))
  out = jax.jit(model.apply)(params, np.load(tmp_path / "images.npy"))
  g = size // patch
  tokens = np.load(tmp_path / "tokens.npy")
  np.testing.assert_allclose(out["pooled"], np.load(tmp_path / "pooled.npy"), atol=1e-4, rtol=0)
  np.testing.assert_allclose(out["grid"], tokens.reshape(-1, g, g, width), atol=1e-4, rtol=0)


def test_converter_names_the_bad_tensor(run_reference, tmp_path, monkeypatch):
  width, layers, heads, patch, size, embed, quick = SHAPES["quick_gelu"]
  run_reference("make_open_clip_vit.py", tmp_path, width, layers, heads, patch, size, embed, quick)
  state = state_dict.read_state_dict(str(tmp_path / "visual.safetensors"))
  monkeypatch.setitem(
    clip_vit.VARIANTS,
    "ViT-ref",
    clip_vit.ViTVariant(size, patch, width, layers, heads, 4 * width, embed, "quick_gelu"),
  )
  missing = {k: v for k, v in state.items() if k != "visual.ln_post.bias"}
  with pytest.raises(KeyError, match="ln_post.bias"):
    open_clip_vit.convert_vision(missing, "ViT-ref", source="x")
  extra = {**state, "visual.attn_pool.q": np.zeros(3, np.float32)}
  with pytest.raises(KeyError, match="attn_pool.q"):
    open_clip_vit.convert_vision(extra, "ViT-ref", source="x")
  with pytest.raises(ValueError, match=r"tensor proj has shape \(32, 25\), expected \(32, 24\)"):
    open_clip_vit.convert_vision(
      {**state, "visual.proj": np.zeros((32, 25), np.float32)}, "ViT-ref", source="x"
    )
  with pytest.raises(KeyError, match="missing tensor.*resblocks.2"):  # a checkpoint of another variant
    open_clip_vit.convert_vision(state, "ViT-L/14", source="x")
  truncated = tmp_path / "truncated.safetensors"
  truncated.write_bytes((tmp_path / "visual.safetensors").read_bytes()[:500])
  with pytest.raises(ValueError, match="truncated.safetensors"):
    state_dict.read_state_dict(str(truncated))
