"""Whole IDEFICS models, converted from a Hugging Face directory, against transformers'
`IdeficsForVisionText2Text` (random weights, fp32): a tiny LLaMA with a block before every second
layer, a CLIP ViT whose every token (class token included, before its final LayerNorm) feeds the
resampler, vector alphas and qk layer norms. Logits at every valid position of
left-padded prompts with two images and text before the first; greedy decoding through the KV cache
against `generate`; a wrong-family config and a truncated safetensors file are errors naming the file."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.convert import idefics
from flamingo_jax.models import flamingo, masking
from tests.reference.test_open_flamingo import to_project_ids

STEPS = 5
EOS = 2  # the tiny IdeficsConfig's eos_token_id


# Vector alphas with qk norms; float alphas and no qk norms are checked block by block (test_idefics.py).
@pytest.fixture(scope="module", params=[("1", "vector")], ids=["qk-vector"])
def converted(request, run_reference, tmp_path_factory):
  out = tmp_path_factory.mktemp("idefics")
  run_reference("make_idefics.py", out, *request.param)
  model_cfg, params = idefics.convert_directory(str(out / "model"))
  return out, model_cfg, params


def _prompt(out, v):
  mask = np.load(out / "mask.npy").astype(bool)
  ids = jnp.asarray(np.where(mask, to_project_ids(np.load(out / "ids.npy"), v), 0))
  return ids, mask, np.load(out / "images.npy")[:, :, None]


def test_logits_match_transformers(converted):
  out, model_cfg, params = converted
  assert model_cfg.vision_variant == "ViT-test-idefics" and model_cfg.xattn.first == 0
  assert model_cfg.xattn.media_reset == "eos"
  v = model_cfg.lm.vocab_size
  ids, mask, images = _prompt(out, v)
  phi = masking.media_index_from_tokens(ids, v, reset_id=EOS)
  assert (phi != masking.media_index_from_tokens(ids, v)).any()  # the prompt's EOS matters
  model = flamingo.make_model(model_cfg)
  logits = jax.jit(model.forward)(
    params, None, images, ids, masking.media_index_from_tokens(ids, v, reset_id=EOS), mask
  )
  want = np.load(out / "logits.npy")
  want = np.concatenate([want[..., :v], want[..., [v + 1, v]]], axis=-1)  # swap the two new rows
  np.testing.assert_allclose(np.asarray(logits)[mask], want[mask], atol=1e-4, rtol=0)


def test_greedy_decoding_matches_generate(converted):
  out, model_cfg, params = converted
  v = model_cfg.lm.vocab_size
  ids, mask, images = _prompt(out, v)
  model = flamingo.make_model(model_cfg)
  cache = model.init_cache(ids.shape[0], ids.shape[1] + STEPS, images.shape[1])
  logits, cache = model.prefill(
    params,
    ids,
    cache,
    visual=model.encode_media(params, None, images),
    media_index=masking.media_index_from_tokens(ids, v, reset_id=EOS),
    token_mask=mask,
  )
  decode = jax.jit(model.decode_step)
  tokens = []
  for _ in range(STEPS):
    nxt = jnp.argmax(logits[:, -1].at[:, v].set(-jnp.inf), axis=-1)[:, None]  # never <image>, as there
    tokens.append(np.asarray(nxt[:, 0]))
    logits, cache = decode(params, nxt.astype(jnp.int32), cache)
  np.testing.assert_array_equal(to_project_ids(np.stack(tokens, axis=1), v), np.load(out / "generated.npy"))


def test_bad_inputs_name_the_file(converted, tmp_path):
  out, _, _ = converted
  wrong = tmp_path / "wrong"
  shutil.copytree(out / "model", wrong)
  config = json.loads((wrong / "config.json").read_text())
  (wrong / "config.json").write_text(json.dumps(dict(config, model_type="llama")))
  with pytest.raises(ValueError, match=f"{wrong}/config.json: model_type 'llama' is not 'idefics'"):
    idefics.convert_directory(str(wrong))
  truncated = tmp_path / "truncated"
  shutil.copytree(out / "model", truncated)
  weights = truncated / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
  with pytest.raises(ValueError, match=f"{weights}: not a readable safetensors file"):
    idefics.convert_directory(str(truncated))


def test_cli_writes_a_run_directory_and_a_failed_conversion_leaves_the_old_one(converted, tmp_path):
  from flamingo_jax.convert import __main__ as convert_main  # pylint: disable=g-import-not-at-top

  out, model_cfg, _ = converted
  target = tmp_path / "idefics"
  convert_main.main(["--from", f"idefics:{out / 'model'}", "--out", str(target)])
  run_config = json.loads((target / "config.json").read_text())
  assert run_config["model"] == model_cfg.to_dict() and run_config["data"] == {"source": "converted"}
  before = sorted(p.name for p in target.rglob("*"))
  broken = tmp_path / "broken"
  shutil.copytree(out / "model", broken)
  (broken / "model.safetensors").write_bytes(b"\0" * 16)
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    convert_main.main(["--from", f"idefics:{broken}", "--out", str(target), "--overwrite"])
  assert sorted(p.name for p in target.rglob("*")) == before  # the earlier output, whole
  assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "idefics"]  # no temporary left
