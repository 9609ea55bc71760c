"""HF safetensors import/export (single and sharded), key errors, and the convert entry point."""

import json
import os
import subprocess
import sys

import haiku as hk
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from flamingo_jax.convert import __main__ as convert_main
from flamingo_jax.convert import converted, hf_lm
from flamingo_jax.models import lm as lm_lib
from tests.convert import reference_llama
from tests.convert.random_lm import random_params

TINY = dict(
  vocab_size=40,
  dim=16,
  num_layers=3,
  num_heads=4,
  num_kv_heads=2,
  head_dim=8,
  ffw_hidden=24,
  mlp="swiglu",
  norm="rms",
  norm_eps=1e-6,
  rope_theta=10000.0,
  tie_embeddings=True,
  max_seq_len=128,
)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def project_logits(config, params, tokens):
  """The project's DecoderLM (no xattn) on converted params. Returns [B, T, V] numpy."""
  c = lm_lib.LMConfig.from_dict(config)
  f = hk.transform(lambda t: lm_lib.DecoderLM(c, name="lm")(t)[0])
  extra = {"lm/extra_embed": {"embeddings": np.zeros((c.num_extra_tokens, c.dim), np.float32)}}
  if not c.tie_embeddings:
    extra["lm/extra_unembed"] = {"w": np.zeros((c.dim, c.num_extra_tokens), np.float32)}
  return np.asarray(f.apply(dict(params, **extra), None, jnp.asarray(tokens)))[..., : c.vocab_size]


def read_state_dict(directory):
  """All tensors of a HF checkpoint directory, read independently of `hf_lm`."""
  files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
  state = {}
  for name in files:
    state.update(st_numpy.load_file(os.path.join(directory, name)))
  return state


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("shard_size", [None, 4000])
def test_save_load_round_trip_and_logits(tmp_path, tied, shard_size):
  config = dict(TINY, tie_embeddings=tied)
  params = random_params(config)
  hf_lm.save_hf_lm(str(tmp_path), config, params, shard_size=shard_size)
  files = sorted(os.listdir(tmp_path))
  if shard_size is None:
    assert files == ["config.json", "model.safetensors"]
  else:
    assert "model.safetensors.index.json" in files
    assert len([f for f in files if f.startswith("model-")]) > 2
  loaded_config, loaded = hf_lm.load_hf_lm(str(tmp_path))
  assert loaded_config == config
  assert_trees_equal(loaded, params)

  state = read_state_dict(str(tmp_path))
  assert ("lm_head.weight" in state) == (not tied)
  # HF nn.Linear layout [out, in]: q_proj of layer 1 is the transposed project q.
  np.testing.assert_array_equal(
    state["model.layers.1.self_attn.q_proj.weight"], params["lm/layers"]["q"][1].T
  )
  tokens = np.array([[1, 7, 3, 39, 0, 12, 5, 5, 8]])
  want = reference_llama.forward(
    state,
    tokens[0],
    layout="hf",
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    norm_eps=1e-6,
    rope_theta=10000.0,
  )
  np.testing.assert_allclose(project_logits(config, loaded, tokens)[0], want, atol=1e-4)


def test_load_dtype(tmp_path):
  hf_lm.save_hf_lm(str(tmp_path), TINY, random_params(TINY))
  _, params = hf_lm.load_hf_lm(str(tmp_path), dtype=ml_dtypes.bfloat16)
  assert all(w.dtype == ml_dtypes.bfloat16 for w in jax.tree.leaves(params))


def _rewrite(directory, state):
  os.remove(os.path.join(directory, "model.safetensors"))
  st_numpy.save_file(state, os.path.join(directory, "model.safetensors"))


def test_key_errors_name_the_key(tmp_path):
  hf_lm.save_hf_lm(str(tmp_path), TINY, random_params(TINY))
  good = read_state_dict(str(tmp_path))

  _rewrite(tmp_path, {k: v for k, v in good.items() if k != "model.layers.2.mlp.up_proj.weight"})
  with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
    hf_lm.load_hf_lm(str(tmp_path))

  _rewrite(tmp_path, dict(good, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(4, np.float32)}))
  with pytest.raises(KeyError, match=r"rotary_emb\.inv_freq"):
    hf_lm.load_hf_lm(str(tmp_path))

  _rewrite(tmp_path, dict(good, **{"lm_head.weight": good["model.embed_tokens.weight"]}))
  with pytest.raises(KeyError, match=r"lm_head\.weight"):  # Tied config, untied file.
    hf_lm.load_hf_lm(str(tmp_path))

  _rewrite(tmp_path, dict(good, **{"model.layers.1.self_attn.k_proj.weight": np.ones((8, 16), np.float32)}))
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
    hf_lm.load_hf_lm(str(tmp_path))


def test_sharded_index_errors_name_the_key(tmp_path):
  hf_lm.save_hf_lm(str(tmp_path), TINY, random_params(TINY), shard_size=4000)
  index_path = tmp_path / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  first_shard = index["weight_map"]["model.embed_tokens.weight"]
  bad = dict(index["weight_map"], **{"model.layers.1.mlp.up_proj.weight": "model-x.safetensors"})
  index_path.write_text(json.dumps(dict(index, weight_map=bad)))
  with pytest.raises(FileNotFoundError, match=r"model-x\.safetensors"):
    hf_lm.load_hf_lm(str(tmp_path))
  bad = dict(index["weight_map"], **{"model.layers.9.mlp.up_proj.weight": first_shard})
  index_path.write_text(json.dumps(dict(index, weight_map=bad)))
  with pytest.raises(KeyError, match=r"model\.layers\.9\.mlp\.up_proj\.weight"):
    hf_lm.load_hf_lm(str(tmp_path))


def test_unsupported_config_fields(tmp_path):
  hf_lm.save_hf_lm(str(tmp_path), TINY, random_params(TINY))
  path = tmp_path / "config.json"
  hf = json.loads(path.read_text())
  for key, value, pattern in [
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}, "rope"),
    ("attention_bias", True, "attention_bias"),
    ("hidden_act", "gelu", "hidden_act"),
    ("model_type", "gpt2", "model_type"),
  ]:
    path.write_text(json.dumps(dict(hf, **{key: value})))
    with pytest.raises(ValueError, match=pattern):
      hf_lm.load_hf_lm(str(tmp_path))
  path.write_text(json.dumps({k: v for k, v in hf.items() if k != "intermediate_size"}))
  with pytest.raises(KeyError, match="intermediate_size"):
    hf_lm.load_hf_lm(str(tmp_path))


def test_convert_entry_point_and_load_converted(tmp_path):
  config = dict(TINY, tie_embeddings=False)
  params = random_params(config)
  hf_lm.save_hf_lm(str(tmp_path / "hf"), config, params, shard_size=4000)
  out = tmp_path / "converted"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO_ROOT)
  proc = subprocess.run(
    [sys.executable, "-m", "flamingo_jax.convert", "--from", f"hf:{tmp_path / 'hf'}", "--out", str(out)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["converted", "hf"]  # No temp dir left behind.
  loaded_config, loaded = converted.load_converted(str(out))
  assert loaded_config == config
  assert_trees_equal(loaded, params)
  with pytest.raises(FileExistsError):
    convert_main.main(["--from", f"hf:{tmp_path / 'hf'}", "--out", str(out)])
  convert_main.main(
    ["--from", f"hf:{tmp_path / 'hf'}", "--out", str(out), "--overwrite", "--dtype", "bfloat16"]
  )
  _, bf16 = converted.load_converted(str(out))
  assert all(w.dtype == ml_dtypes.bfloat16 for w in jax.tree.leaves(bf16))
  assert sorted(os.listdir(tmp_path)) == ["converted", "hf"]
