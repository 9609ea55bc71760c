"""GGUF import: q/k permutation, tiny written GGUFs (exact params, errors), SmolLM2 logits.

The SmolLM2 GGUF is parsed and dequantised once per module (module-scoped fixtures).
"""

import gguf
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.convert import gguf_lm, names
from flamingo_jax.data import tokenizer as tokenizer_lib
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib
from tests.convert import reference_llama

TINY = dict(
  vocab_size=32,
  dim=16,
  num_layers=2,
  num_heads=4,
  num_kv_heads=2,
  head_dim=4,
  ffw_hidden=24,
  mlp="swiglu",
  norm="rms",
  norm_eps=1e-5,
  rope_theta=10000.0,
  tie_embeddings=True,
  max_seq_len=64,
)
# The GGUF file's metadata gives exactly the size table's SmolLM2 LM.
SMOLLM2 = dict(flamingo.SIZES["smollm2"]["lm"])


def llama_cpp_permute(w, n_head):
  """Copied from llama.cpp's convert_hf_to_gguf.py (LlamaModel.permute), HF -> GGUF rows."""
  return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def reference_kwargs(config):
  return {
    k: config[k] for k in ("num_layers", "num_heads", "num_kv_heads", "head_dim", "norm_eps", "rope_theta")
  }


def project_logits(config, params, tokens, token_mask):
  """The project's DecoderLM (no xattn) on converted params. Returns [B, T, V] numpy."""
  c = lm_lib.LMConfig.from_dict(config)
  f = hk.transform(lambda t, m: lm_lib.DecoderLM(c, name="lm")(t, token_mask=m)[0])
  # `lm/extra_embed` (<image>, <EOC>) is Flamingo's, not the imported LM's: zeros here.
  params = dict(
    params, **{"lm/extra_embed": {"embeddings": np.zeros((c.num_extra_tokens, c.dim), np.float32)}}
  )
  if not c.tie_embeddings:
    params["lm/extra_unembed"] = {"w": np.zeros((c.dim, c.num_extra_tokens), np.float32)}
  logits = jax.jit(f.apply)(params, None, jnp.asarray(tokens), jnp.asarray(token_mask))
  return np.asarray(logits)[..., : c.vocab_size]


def tiny_hf_tensors(config, seed=0, untied=False):
  """Random HF-named [out, in] tensors of a tiny Llama."""
  rng = np.random.default_rng(seed)
  d, f, q, kv = (
    config["dim"],
    config["ffw_hidden"],
    config["num_heads"] * config["head_dim"],
    config["num_kv_heads"] * config["head_dim"],
  )
  normal = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-1])).astype(np.float32)
  t = {
    "model.embed_tokens.weight": rng.standard_normal((config["vocab_size"], d)).astype(np.float32),
    "model.norm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
  }
  for i in range(config["num_layers"]):
    p = f"model.layers.{i}."
    t[p + "input_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    t[p + "post_attention_layernorm.weight"] = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    t[p + "self_attn.q_proj.weight"] = normal(q, d)
    t[p + "self_attn.k_proj.weight"] = normal(kv, d)
    t[p + "self_attn.v_proj.weight"] = normal(kv, d)
    t[p + "self_attn.o_proj.weight"] = normal(d, q)
    t[p + "mlp.gate_proj.weight"] = normal(f, d)
    t[p + "mlp.up_proj.weight"] = normal(f, d)
    t[p + "mlp.down_proj.weight"] = normal(d, f)
  if untied:
    t["lm_head.weight"] = normal(config["vocab_size"], d)
  return t


def hf_to_gguf_tensors(hf, config):
  """llama.cpp's converter, by hand: renames and permutes q/k rows."""
  g = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
  if "lm_head.weight" in hf:
    g["output.weight"] = hf["lm_head.weight"]
  for i in range(config["num_layers"]):
    p = f"model.layers.{i}."
    b = f"blk.{i}."
    g[b + "attn_norm.weight"] = hf[p + "input_layernorm.weight"]
    g[b + "ffn_norm.weight"] = hf[p + "post_attention_layernorm.weight"]
    g[b + "attn_q.weight"] = llama_cpp_permute(hf[p + "self_attn.q_proj.weight"], config["num_heads"])
    g[b + "attn_k.weight"] = llama_cpp_permute(hf[p + "self_attn.k_proj.weight"], config["num_kv_heads"])
    g[b + "attn_v.weight"] = hf[p + "self_attn.v_proj.weight"]
    g[b + "attn_output.weight"] = hf[p + "self_attn.o_proj.weight"]
    g[b + "ffn_gate.weight"] = hf[p + "mlp.gate_proj.weight"]
    g[b + "ffn_up.weight"] = hf[p + "mlp.up_proj.weight"]
    g[b + "ffn_down.weight"] = hf[p + "mlp.down_proj.weight"]
  return g


def write_gguf(path, config, tensors, drop_keys=()):
  w = gguf.GGUFWriter(str(path), "llama")
  meta = {
    "block_count": w.add_block_count,
    "context_length": w.add_context_length,
    "embedding_length": w.add_embedding_length,
    "feed_forward_length": w.add_feed_forward_length,
    "head_count": w.add_head_count,
    "head_count_kv": w.add_head_count_kv,
    "rope_freq_base": w.add_rope_freq_base,
    "rms_eps": w.add_layer_norm_rms_eps,
    "vocab_size": w.add_vocab_size,
  }
  values = {
    "block_count": config["num_layers"],
    "context_length": config["max_seq_len"],
    "embedding_length": config["dim"],
    "feed_forward_length": config["ffw_hidden"],
    "head_count": config["num_heads"],
    "head_count_kv": config["num_kv_heads"],
    "rope_freq_base": config["rope_theta"],
    "rms_eps": config["norm_eps"],
    "vocab_size": config["vocab_size"],
  }
  for key, add in meta.items():
    if key not in drop_keys:
      add(values[key])
  for name, arr in tensors.items():
    w.add_tensor(name, np.ascontiguousarray(arr))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


# -- the permutation ----------------------------------------------------------------------------


@pytest.mark.parametrize("n_head,head_dim", [(9, 64), (3, 64), (2, 4), (1, 2)])
def test_permutation_round_trips(n_head, head_dim):
  w = np.random.default_rng(0).standard_normal((n_head * head_dim, 5))
  np.testing.assert_array_equal(names.permute_rope(w, n_head), llama_cpp_permute(w, n_head))
  np.testing.assert_array_equal(names.unpermute_rope(names.permute_rope(w, n_head), n_head), w)
  np.testing.assert_array_equal(names.permute_rope(names.unpermute_rope(w, n_head), n_head), w)


def test_permutation_row_map():
  # One head, dh = 4: HF pairs rows (0, 2) and (1, 3); llama.cpp pairs (0, 1) and (2, 3).
  hf_rows = np.array(["a0", "a1", "b0", "b1"])
  np.testing.assert_array_equal(names.permute_rope(hf_rows, 1), ["a0", "b0", "a1", "b1"])
  np.testing.assert_array_equal(names.unpermute_rope(np.array(["a0", "b0", "a1", "b1"]), 1), hf_rows)


def test_rope_layouts_agree_after_unpermute():
  """Interleaved RoPE on GGUF rows == rotate-half RoPE on unpermuted rows, permuted back."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((5, 3, 8))  # [T, H, dh] in the GGUF (interleaved) feature order.
  hf_x = names.unpermute_rope(x.transpose(1, 2, 0).reshape(24, 5), 3).reshape(3, 8, 5)
  rotated_hf = reference_llama.rope_half(hf_x.transpose(2, 0, 1), 1e4)
  back = names.permute_rope(rotated_hf.transpose(1, 2, 0).reshape(24, 5), 3)
  np.testing.assert_allclose(
    back.reshape(3, 8, 5).transpose(2, 0, 1), reference_llama.rope_interleaved(x, 1e4), atol=1e-12
  )


# -- tiny written GGUF files ----------------------------------------------------------------------


@pytest.mark.parametrize("untied", [False, True])
def test_tiny_gguf_exact_params_and_logits(tmp_path, untied):
  config = dict(TINY, tie_embeddings=not untied)
  hf = tiny_hf_tensors(config, untied=untied)
  path = write_gguf(tmp_path / "tiny.gguf", config, hf_to_gguf_tensors(hf, config))
  loaded_config, params = gguf_lm.load_gguf_lm(path)
  assert loaded_config == config
  expected_keys = {"lm/embed", "lm/layers", "lm/final_norm"} | ({"lm/unembed"} if untied else set())
  assert set(params) == expected_keys
  np.testing.assert_array_equal(params["lm/layers"]["q"][1], hf["model.layers.1.self_attn.q_proj.weight"].T)
  np.testing.assert_array_equal(params["lm/layers"]["k"][0], hf["model.layers.0.self_attn.k_proj.weight"].T)
  np.testing.assert_array_equal(params["lm/layers"]["down"][1], hf["model.layers.1.mlp.down_proj.weight"].T)
  tokens = np.array([[3, 1, 4, 1, 5, 9, 2, 6]])
  ref_gguf = reference_llama.forward(
    hf_to_gguf_tensors(hf, config), tokens[0], layout="gguf", **reference_kwargs(config)
  )
  ref_hf = reference_llama.forward(hf, tokens[0], layout="hf", **reference_kwargs(config))
  np.testing.assert_allclose(ref_gguf, ref_hf, atol=1e-10)
  got = project_logits(config, params, tokens, np.ones_like(tokens, bool))
  np.testing.assert_allclose(got[0], ref_hf, atol=1e-4)


def test_tiny_gguf_errors_name_the_tensor(tmp_path):
  hf = tiny_hf_tensors(TINY)
  good = hf_to_gguf_tensors(hf, TINY)

  missing = {k: v for k, v in good.items() if k != "blk.1.ffn_up.weight"}
  with pytest.raises(KeyError, match=r"blk\.1\.ffn_up\.weight"):
    gguf_lm.load_gguf_lm(write_gguf(tmp_path / "missing.gguf", TINY, missing))

  extra = dict(good, **{"rope_freqs.weight": np.ones(2, np.float32)})
  with pytest.raises(KeyError, match=r"rope_freqs\.weight"):
    gguf_lm.load_gguf_lm(write_gguf(tmp_path / "extra.gguf", TINY, extra))

  shaped = dict(good, **{"blk.0.attn_v.weight": np.ones((4, 16), np.float32)})
  with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight"):
    gguf_lm.load_gguf_lm(write_gguf(tmp_path / "shape.gguf", TINY, shaped))

  with pytest.raises(KeyError, match=r"llama\.feed_forward_length"):
    gguf_lm.load_gguf_lm(write_gguf(tmp_path / "meta.gguf", TINY, good, drop_keys=("feed_forward_length",)))


# -- SmolLM2-135M-Instruct ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
  """(reader, config, params, GGUF-layout tensors, tokenizer), once per module.

  The GGUF-layout tensors for the reference are re-derived from the loaded params
  (`permute_rope` is pinned to llama.cpp's formula above; dequantising the file twice costs
  seconds) and spot-checked against the file in `test_smollm2_tensors_equal_file`.
  """
  reader, _ = gguf_lm.open_gguf(gguf_lm.smollm2_gguf_path())
  config, params = gguf_lm.load_gguf_lm(reader)
  gguf_tensors = names.to_source_tensors(names.GGUF_TABLE, params, config)
  return reader, config, params, gguf_tensors, tokenizer_lib.Tokenizer.from_gguf(reader)


def test_smollm2_config_and_shapes(smollm2):
  _, config, params, _, tok = smollm2
  assert config == SMOLLM2
  assert tok.base_vocab_size == config["vocab_size"]
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), params)
  f32 = np.dtype(np.float32)
  assert shapes == {
    "lm/embed": {"embeddings": ((49152, 576), f32)},
    "lm/final_norm": {"scale": ((576,), f32)},
    "lm/layers": {
      "attn_norm": ((30, 576), f32),
      "mlp_norm": ((30, 576), f32),
      "q": ((30, 576, 576), f32),
      "k": ((30, 576, 192), f32),
      "v": ((30, 576, 192), f32),
      "o": ((30, 576, 576), f32),
      "gate": ((30, 576, 1536), f32),
      "up": ((30, 576, 1536), f32),
      "down": ((30, 1536, 576), f32),
    },
  }


def test_smollm2_tensors_equal_file(smollm2):
  reader, _, _, gguf_tensors, _ = smollm2
  tensors = {t.name: t for t in reader.tensors}
  assert set(tensors) == set(gguf_tensors)
  for name in (
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.attn_k.weight",
    "blk.29.attn_q.weight",
    "blk.29.attn_k.weight",
    "blk.13.attn_v.weight",
    "blk.7.ffn_down.weight",
    "blk.3.attn_norm.weight",
    "output_norm.weight",
  ):
    t = tensors[name]
    np.testing.assert_array_equal(
      gguf_tensors[name], gguf.quants.dequantize(t.data, t.tensor_type), err_msg=name
    )


def test_smollm2_project_logits_match_reference(smollm2):
  """Project DecoderLM on the converted params == numpy llama.cpp-layout reference (fp64)."""
  _, config, params, gguf_tensors, tok = smollm2
  prompts = [
    "The capital of France is",
    tokenizer_lib.chatml([{"role": "user", "content": "Name 3 colours."}], add_generation_prompt=True),
    "x = 12345 * 67;\n  print(x)  # café 🙂",
  ]
  ids = [tok.encode(p) for p in prompts]
  t = max(map(len, ids))
  tokens = np.full((len(ids), t), tok.pad_id, np.int32)
  mask = np.zeros((len(ids), t), bool)
  for b, row in enumerate(ids):
    tokens[b, : len(row)] = row
    mask[b, : len(row)] = True
  got = project_logits(config, params, tokens, mask)
  want = reference_llama.forward_batch(gguf_tensors, ids, layout="gguf", **reference_kwargs(config))
  for b, row in enumerate(ids):
    np.testing.assert_allclose(got[b, : len(row)], want[b], atol=1e-3, rtol=0, err_msg=prompts[b])
  assert tok.decode([int(want[0][-1].argmax())]) == " Paris"
