"""The MPT language model (ALiBi, fused Wqkv, LayerNorm without bias) against transformers'
MptForCausalLM: logits with left padding, and greedy decoding with the KV cache."""

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flamingo_jax.convert import hf_lm
from flamingo_jax.models import kv_cache
from flamingo_jax.models import lm as lm_lib


@pytest.mark.parametrize("n_heads", [4, 6])  # ALiBi slopes for a power of two, and the interleaved rule
def test_logits_and_greedy_tokens_match_transformers(run_reference, tmp_path, n_heads):
  run_reference("make_hf_mpt.py", tmp_path, n_heads)
  config, params = hf_lm.load_hf_lm(str(tmp_path / "model"))
  assert (config["position"], config["norm"], config["mlp"]) == ("alibi", "layer_nobias", "gelu_exact")
  c = lm_lib.LMConfig.from_dict(config)
  params = dict(
    params, **{"lm/extra_embed": {"embeddings": np.zeros((c.num_extra_tokens, c.dim), np.float32)}}
  )
  ids, mask = np.load(tmp_path / "ids.npy"), np.load(tmp_path / "mask.npy").astype(bool)
  lm = hk.without_apply_rng(
    hk.transform(lambda t, m, cache=None: lm_lib.DecoderLM(c, name="lm")(t, token_mask=m, cache=cache))
  )
  logits, _ = jax.jit(lm.apply)(params, jnp.asarray(ids), jnp.asarray(mask))
  want = np.load(tmp_path / "logits.npy")
  np.testing.assert_allclose(np.asarray(logits)[..., : c.vocab_size][mask], want[mask], atol=1e-4, rtol=0)

  # Greedy decoding through the KV cache: the prompt, then one token per call.
  cache = kv_cache.init_cache(c, None, 2, 16, 0, 0)
  step = jax.jit(lm.apply)
  out, cache = step(params, jnp.asarray(ids), jnp.asarray(mask), cache)
  tokens = []
  for _ in range(5):
    nxt = jnp.argmax(out[:, -1, : c.vocab_size], axis=-1)[:, None].astype(jnp.int32)
    tokens.append(np.asarray(nxt[:, 0]))
    out, cache = step(params, nxt, jnp.ones((2, 1), bool), cache)
  np.testing.assert_array_equal(np.stack(tokens, 1), np.load(tmp_path / "generated.npy"))
