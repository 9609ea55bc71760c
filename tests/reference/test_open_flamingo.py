"""Whole OpenFlamingo models, converted, against open_flamingo itself (random weights, fp32): a tiny
Llama (untied, a block before every second layer) and a tiny MPT (ALiBi, tied, a block before every
layer), each with a random open_clip ViT. Logits at every valid position of prompts with two images,
text before the first image and padding; greedy decoding through the KV cache against `generate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.convert import open_flamingo
from flamingo_jax.models import flamingo, masking

STEPS = 5


def to_project_ids(ids: np.ndarray, vocab: int) -> np.ndarray:
  """OpenFlamingo's ids (`<|endofchunk|>` V, `<image>` V + 1) -> the project's (`<image>` V, `<EOC>` V + 1)."""
  return np.where(ids == vocab, vocab + 1, np.where(ids == vocab + 1, vocab, ids))


@pytest.fixture(scope="module", params=[("llama", 2), ("mpt", 1)], ids=["llama", "mpt"])
def converted(request, run_reference, tmp_path_factory):
  kind, every = request.param
  out = tmp_path_factory.mktemp(f"open_flamingo_{kind}")
  run_reference("make_open_flamingo.py", out, kind, every)
  model_cfg, params = open_flamingo.convert_checkpoint(
    str(out / "checkpoint.safetensors"),
    str(out / "lm"),
    str(out / "visual.safetensors"),
    vision_variant="ViT-test",
    every=every,
  )
  return out, model_cfg, params


def test_params_are_the_models_tree(converted):
  _, model_cfg, params = converted
  shapes = flamingo.param_shapes(model_cfg)
  assert sorted(params) == sorted(shapes)
  for module, leaves in shapes.items():
    assert sorted(params[module]) == sorted(leaves), module
    for name, shape in leaves.items():
      assert params[module][name].shape == shape.shape, (module, name)


def test_logits_match_open_flamingo(converted):
  out, model_cfg, params = converted
  v = model_cfg.lm.vocab_size
  mask = np.load(out / "mask.npy").astype(bool)
  ids = np.where(mask, to_project_ids(np.load(out / "ids.npy"), v), 0)
  images = np.load(out / "images.npy")[:, :, None]  # [B, N, F=1, H, W, 3]
  model = flamingo.make_model(model_cfg)
  media_index = masking.media_index_from_tokens(jnp.asarray(ids), v)
  logits = jax.jit(model.forward)(params, None, images, jnp.asarray(ids), media_index, jnp.asarray(mask))
  want = np.load(out / "logits.npy")
  want = np.concatenate([want[..., :v], want[..., [v + 1, v]]], axis=-1)  # drop <PAD>, swap the new rows
  np.testing.assert_allclose(np.asarray(logits)[mask], want[mask], atol=1e-4, rtol=0)


def test_greedy_decoding_matches_generate(converted):
  out, model_cfg, params = converted
  v = model_cfg.lm.vocab_size
  mask = np.load(out / "gen_mask.npy").astype(bool)  # left padding, as `generate` takes prompts
  ids = jnp.asarray(np.where(mask, to_project_ids(np.load(out / "gen_ids.npy"), v), 0))
  images = np.load(out / "images.npy")[:, :, None]
  model = flamingo.make_model(model_cfg)
  visual = model.encode_media(params, None, images)
  cache = model.init_cache(ids.shape[0], ids.shape[1] + STEPS, images.shape[1])
  logits, cache = model.prefill(
    params, ids, cache, visual=visual, media_index=masking.media_index_from_tokens(ids, v), token_mask=mask
  )
  decode = jax.jit(model.decode_step)
  tokens = []
  for _ in range(STEPS):
    nxt = jnp.argmax(logits[:, -1].at[:, v].set(-jnp.inf), axis=-1)[:, None]  # never <image>, as there
    tokens.append(np.asarray(nxt[:, 0]))
    logits, cache = decode(params, nxt.astype(jnp.int32), cache)
  got = to_project_ids(np.stack(tokens, axis=1), v)
  np.testing.assert_array_equal(got, np.load(out / "generated.npy"))


def test_torch_checkpoint_reads_as_its_safetensors_twin(converted, run_reference):
  """`checkpoint.pt` through `torch.load(weights_only=True)` (where torch is: the reference
  interpreter) gives the same tensors; a pickle that runs code is refused, naming the file."""
  out, _, _ = converted
  run_reference("check_torch_reader.py", out)
