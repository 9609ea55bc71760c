"""Tests of flamingo_jax.generate and flamingo_jax.pretrained on the tiny model (a random tiny LM
written as a HF checkpoint), plus SmolLM2 checks ("Paris")."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from PIL import Image

from configs import flamingo as flamingo_config
from flamingo_jax import generate, pretrained, sources
from flamingo_jax.convert import hf_lm
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.eval import engine as engine_lib
from flamingo_jax.models import flamingo, masking
from tests.convert import random_lm
from tests.models import helpers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["<unk>", "<|endoftext|>"] + [f"w{i}" for i in range(2, 64)]
PROMPT = "w5 w7 w9 w11 w3"
IMAGE_PROMPT = "w5 <image> w9 w11 w3"  # as many tokens as PROMPT: shared compilations


def _tiny_lm_config() -> dict:
  lm = dict(flamingo.model_config("tiny").lm)
  del lm["num_extra_tokens"]
  return lm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(config, 'hf:DIR', LM params, tokenizer, PNG path): DIR holds the LM and its tokenizer."""
  directory = tmp_path_factory.mktemp("tiny_lm")
  lm_params = random_lm.random_params(_tiny_lm_config())
  hf_lm.save_hf_lm(str(directory), _tiny_lm_config(), lm_params)
  base = tokenizers.Tokenizer(
    tokenizers.models.WordLevel({t: i for i, t in enumerate(WORDS)}, unk_token="<unk>")
  )
  base.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tokenizer_lib.Tokenizer(base, bos_id=1, eos_id=1, pad_id=0).save_hf(str(directory))
  png = str(directory / "image.png")
  pixels = np.random.default_rng(1).integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(png)
  tok = tokenizer_lib.Tokenizer.from_hf(str(directory / "tokenizer.json"))
  return flamingo_config.get_config("size=tiny"), f"hf:{directory}", lm_params, tok, png


@pytest.fixture(scope="module")
def full_params(tiny):
  """Full tiny Flamingo params from `init_flamingo_with_lm` (one slow init for the module)."""
  config, spec, _, _, _ = tiny
  return pretrained.init_flamingo_with_lm(config.model, spec, jax.random.PRNGKey(0))


def _engine(model_cfg, tok, banned):
  """The inference engine as `generate.run` builds it (greedy, one prompt per call)."""
  model = flamingo.make_model(model_cfg)
  return engine_lib.EvalModel(model, tok, batch_size=1, num_beams=1, image_batch_size=1, banned_ids=banned)


def _generate(setup, tok, prompt, images, n, add_bos, params=None):
  """`generate.continue_prompt` of (engine, params) `setup` (or other `params`, same tree)."""
  engine, default = setup
  ids = generate.encode_prompt(tok, prompt, 0 if images is None else images.shape[1], add_bos)
  return generate.continue_prompt(
    engine, default if params is None else params, tok, ids, images, max_new_tokens=n
  )


@pytest.fixture(scope="module")
def trained(tiny, full_params):
  """(engine, params): a "trained" Flamingo (random non-zero gates), as with --workdir (BOS first)."""
  config, _, _, tok, _ = tiny
  params = helpers.open_gates(full_params, jax.random.PRNGKey(3))
  return _engine(config.model, tok, [tok.image_id]), params


@pytest.fixture(scope="module")
def at_init(tiny):
  """(engine, LM-only params) as `run` builds them without --workdir for a text-only prompt."""
  config, spec, _, tok, _ = tiny
  params = pretrained.init_flamingo_with_lm(config.model, spec, jax.random.PRNGKey(0), text_only=True)
  return _engine(config.model, tok, [tok.image_id, tok.eoc_id]), params


@pytest.fixture(scope="module")
def forward(tiny):
  """forward(params, images, tokens, valid) -> logits: the training forward (no cache), jitted once
  for the module; phi from the `<image>` markers."""
  config, _, _, tok, _ = tiny
  model = flamingo.make_model(config.model)

  @jax.jit
  def fn(params, images, tokens, valid):
    media_index = masking.media_index_from_tokens(tokens, tok.image_id)
    return model.forward(params, None, images, tokens, media_index, valid)

  return fn


def _uncached_greedy(forward, params, ids, images, n, banned, stops, image_size):
  """Greedy decoding that re-runs the training forward over a right-padded buffer per token."""
  total = len(ids) + n
  if images is None:  # no markers: media_index is -1 everywhere, the dummy image is never seen
    images = np.zeros((1, 1, 1, image_size, image_size, 3), np.float32)
  buf, valid, out = np.zeros([1, total], np.int32), np.zeros([1, total], bool), []
  buf[0, : len(ids)], valid[0, : len(ids)] = ids, True
  for i in range(n):
    pos = len(ids) + i
    logits = np.array(forward(params, images, buf, valid))[0, pos - 1]
    logits[list(banned)] = -np.inf
    tok = int(np.argmax(logits))
    out.append(tok)
    if tok in stops:
      break
    buf[0, pos], valid[0, pos] = tok, True
  return tuple(out)


def test_init_with_lm_is_exactly_the_lm(tiny, full_params, at_init, forward):
  config, _, lm_params, _, png = tiny
  for module, sub in lm_params.items():
    for name, w in sub.items():
      np.testing.assert_array_equal(full_params[module][name], w)
  np.testing.assert_array_equal(full_params["lm/gated_xattn"]["attn_gate"], 0.0)
  np.testing.assert_array_equal(full_params["lm/gated_xattn"]["ffw_gate"], 0.0)
  # The text-only init (and `param_shapes(text_only=True)`) is exactly the full tree's lm/ part.
  shape = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype)), tree)
  lm_part = {m: sub for m, sub in full_params.items() if m.startswith("lm/")}
  assert shape(dict(at_init[1])) == shape(lm_part)
  assert shape(pretrained.param_shapes(config.model, text_only=True)) == shape(lm_part)
  # With images, the Flamingo at init computes exactly the plain LM (lm_only skips xattn).
  images = generate.load_images([png], config.model.image_size)
  ids = np.asarray([[5, 6, 64, 7, 8] + [9] * 9], np.int32)  # the shapes of the uncached tests
  valid = np.ones(ids.shape, bool)
  with_media = forward(full_params, images, ids, valid)
  model = flamingo.make_model(config.model)
  plain, _ = jax.jit(model.lm_forward, static_argnums=7)(full_params, None, ids, None, None, None, None, True)
  np.testing.assert_array_equal(np.asarray(with_media), np.asarray(plain))


@pytest.mark.parametrize("with_image", [False, True])
def test_kv_cached_greedy_equals_uncached(tiny, trained, forward, with_image):
  config, _, _, tok, png = tiny
  engine, params = trained
  prompt = IMAGE_PROMPT if with_image else PROMPT
  images = generate.load_images([png] if with_image else [], config.model.image_size)
  n = 8
  out = _generate(trained, tok, prompt, images, n, add_bos=True)
  ids = generate.encode_prompt(tok, prompt, 1 if with_image else 0, True)
  expected = _uncached_greedy(
    forward, params, ids, images, n, engine.banned, engine.stop_ids, config.model.image_size
  )
  assert out.tokens == tuple(t for t in expected if t not in engine.stop_ids)
  assert len(out.tokens) >= 2  # a real comparison, not an immediate stop


def test_the_cli_path_is_the_engine_and_beams_run(tiny, at_init):
  config, spec, _, tok, _ = tiny
  greedy = _generate(at_init, tok, PROMPT, None, 6, add_bos=tok.add_bos)
  assert generate.run(config, prompt=PROMPT, lm=spec, max_new_tokens=6) == greedy
  beams = generate.run(config, prompt=PROMPT, lm=spec, max_new_tokens=6, beam=3)
  assert 1 <= len(beams.tokens) <= 6


@pytest.mark.parametrize("with_image", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_workdir_restores_the_runs_params(tiny, trained, tmp_path, with_image):
  from flamingo_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from flamingo_jax.train import trainable  # pylint: disable=g-import-not-at-top

  config, spec, _, tok, png = tiny
  _, params = trained
  train_p, frozen_p = trainable.split(params, config.trainable, config.frozen)
  frozen_p = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), frozen_p)  # as the loop saves
  state = state_lib.TrainState(
    jnp.int32(5),
    jax.tree.map(jnp.asarray, train_p),
    frozen_p,
    {},
    jax.random.PRNGKey(0),
    jnp.int32(0),
    jnp.int32(0),
  )
  with checkpoint.Checkpointer(tmp_path, config=config) as ckpt:
    ckpt.save(5, state, {"step": 5}, force=True)
  prompt, paths = (IMAGE_PROMPT, [png]) if with_image else (PROMPT, [])
  kw = dict(prompt=prompt, image_paths=paths, lm=spec, max_new_tokens=8)
  out = generate.run(config, workdir=str(tmp_path), **kw)
  restored = jax.tree.map(lambda x: np.asarray(x, np.float32), trainable.merge(train_p, frozen_p))
  images = generate.load_images(paths, config.model.image_size)
  assert out == _generate(trained, tok, prompt, images, 8, add_bos=True, params=restored)
  with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
    generate.run(config, workdir=str(tmp_path / "empty"), **kw)


def test_prompt_and_source_errors(tiny, at_init):
  config, spec, _, tok, png = tiny
  with pytest.raises(ValueError, match=r"1 <image> marker\(s\) but 0 image"):
    generate.encode_prompt(tok, IMAGE_PROMPT, 0, False)
  with pytest.raises(ValueError, match="exceed"):
    _generate(at_init, tok, PROMPT, None, 300, add_bos=False)
  with pytest.raises(ValueError, match="0 <image> marker"):
    generate.run(config, prompt=PROMPT, image_paths=[png], lm=spec)
  with pytest.raises(ValueError, match="no params"):
    generate.run(config, prompt=PROMPT)
  with pytest.raises(ValueError, match="expected 'smollm2'"):
    sources.load_lm("safetensors:/x")
  with pytest.raises(ValueError, match="holds no tokenizer"):
    sources.make_tokenizer("", "converted:/nowhere")
  with pytest.raises(ValueError, match="cannot read it as an image"):
    generate.load_images([os.path.join(spec[3:], "config.json")], 32)


def test_merge_lm_params_errors(tiny, full_params):
  config, _, lm_params, _, _ = tiny
  bad = {m: dict(sub) for m, sub in lm_params.items()}
  bad["lm/layers"]["q"] = np.zeros((5, 32, 16), np.float32)
  with pytest.raises(
    ValueError,
    match=r"lm/layers/q: shape \(5, 32, 16\) in the LM source, "
    r"\(5, 32, 32\) in the Flamingo params",
  ):
    pretrained.merge_lm_params(full_params, bad)
  missing = {m: sub for m, sub in lm_params.items() if m != "lm/final_norm"}
  with pytest.raises(ValueError, match="lm/final_norm: missing from the LM source"):
    pretrained.merge_lm_params(full_params, missing)
  extra = dict(lm_params, **{"lm/unembed": {"w": np.zeros((32, 64), np.float32)}})
  with pytest.raises(ValueError, match="lm/unembed: in the LM source but not an LM module"):
    pretrained.merge_lm_params(full_params, extra)
  leftover = {m: dict(sub) for m, sub in lm_params.items()}
  leftover["lm/layers"]["bias"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match="lm/layers/bias: in the LM source but not in the Flamingo"):
    pretrained.merge_lm_params(full_params, leftover)
  source = dict(_tiny_lm_config(), dim=48, rope_theta=5e5)
  with pytest.raises(ValueError, match=r"dim: source 48 != model 32(.|\n)*rope_theta"):
    pretrained.merge_lm_params(
      full_params, lm_params, source_config=source, model_lm_config=dict(config.model.lm)
    )
  merged = pretrained.merge_lm_params(
    full_params, lm_params, source_config=_tiny_lm_config(), model_lm_config=dict(config.model.lm)
  )
  assert merged["lm/gated_xattn"] is not full_params["lm/gated_xattn"]  # a copy
  with pytest.raises(ValueError, match="does not match config.model.lm"):
    pretrained.init_flamingo_with_lm(
      flamingo.model_config("smollm2"), tiny[1], jax.random.PRNGKey(0), text_only=True
    )


def test_command_line_on_the_tiny_model(tiny, at_init):
  _, spec, _, tok, _ = tiny
  cmd = [
    sys.executable,
    "-m",
    "flamingo_jax.generate",
    "--config",
    "configs/flamingo.py:size=tiny",
    f"--lm={spec}",
    f"--prompt={PROMPT}",
    "--max_new_tokens=6",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.rstrip("\n") == _generate(at_init, tok, PROMPT, None, 6, add_bos=tok.add_bos).text


def _smollm2_or_skip():
  try:
    return sources.parse_lm("smollm2")[1]
  except FileNotFoundError as e:
    pytest.skip(str(e))


def test_smollm2_greedy_says_paris():
  """The real SmolLM2 in the Flamingo LM. The non-LM `lm/...` params are zeros instead of their
  random init (identical outputs: the gates are 0) to skip compiling their initialisers."""
  _smollm2_or_skip()
  model_cfg = flamingo.model_config("smollm2")  # (the full config imports TensorFlow: slow)
  source_config, lm_params = sources.load_lm("smollm2")
  shapes = pretrained.param_shapes(model_cfg, text_only=True)
  zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  params = pretrained.merge_lm_params(
    zeros, lm_params, source_config=source_config, model_lm_config=dict(model_cfg.lm)
  )
  tok = sources.make_tokenizer("smollm2", "smollm2")
  engine = _engine(model_cfg, tok, [tok.image_id, tok.eoc_id])
  out = _generate((engine, params), tok, "The capital of France is", None, 4, add_bos=tok.add_bos)
  assert " Paris" in out.text, out


@pytest.mark.slow
def test_smollm2_command_says_paris():
  _smollm2_or_skip()
  cmd = [
    sys.executable,
    "-m",
    "flamingo_jax.generate",
    "--config",
    "configs/main_job.py",
    "--prompt",
    "The capital of France is",
    "--max_new_tokens",
    "8",
  ]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Paris" in proc.stdout, proc.stdout
