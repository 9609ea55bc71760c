"""Random LM params in the project's layout, for tests of conversion, loading and generation.

Shapes: L layers, D width, F MLP width, V vocabulary; q/k/v/o are [L, D, H*dh] / [L, H*dh, D].
"""

import numpy as np


def random_params(config, seed=0):
  """Project-layout LM params (numpy float32) for an LM config dict (`lm.LMConfig` fields)."""
  rng = np.random.default_rng(seed)
  d, f, l, v = config["dim"], config["ffw_hidden"], config["num_layers"], config["vocab_size"]
  q, kv = config["num_heads"] * config["head_dim"], config["num_kv_heads"] * config["head_dim"]
  w = lambda *s: (rng.standard_normal(s) / np.sqrt(s[-2])).astype(np.float32)
  params = {
    "lm/embed": {"embeddings": rng.standard_normal((v, d)).astype(np.float32)},
    "lm/layers": {
      "attn_norm": (1 + 0.1 * rng.standard_normal((l, d))).astype(np.float32),
      "mlp_norm": (1 + 0.1 * rng.standard_normal((l, d))).astype(np.float32),
      "q": w(l, d, q),
      "k": w(l, d, kv),
      "v": w(l, d, kv),
      "o": w(l, q, d),
      "gate": w(l, d, f),
      "up": w(l, d, f),
      "down": w(l, f, d),
    },
    "lm/final_norm": {"scale": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)},
  }
  if not config.get("tie_embeddings", True):
    params["lm/unembed"] = {"w": w(d, v)}
  return params
