"""Hugging Face Llama-family checkpoints (Llama, SmolLM, Mistral-like) <-> project LM params, and MPT
checkpoints (`MptForCausalLM`: OpenFlamingo v2's language models) -> project LM params.

A checkpoint directory holds `config.json` and either `model.safetensors` or the shards listed
in `model.safetensors.index.json` (`{"metadata": {...}, "weight_map": {tensor: file}}`). Only
the safetensors numpy API is used (no torch, no pickle). Supported: RMSNorm, RoPE without
scaling, grouped-query attention without biases, SwiGLU (`silu`), tied or untied embeddings.
"""

import contextlib
import json
import os

import numpy as np
from safetensors import numpy as st_numpy
from safetensors import safe_open

from flamingo_jax.convert import names

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MODEL_TYPES = ("llama", "mistral", "mpt")


def _require(hf: dict, key: str, path: str):
  if hf.get(key) is None:
    raise KeyError(f"{path}: field {key!r} is missing")
  return hf[key]


def config_from_hf(hf: dict, path: str) -> dict:
  """LM config dict from a HF `config.json` dict.

  Raises:
    KeyError: a required field is missing (named).
    ValueError: a field value the project LM does not implement (named).
  """
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ValueError(f"{path}: model_type {model_type!r} is not supported ({_MODEL_TYPES})")
  if model_type == "mpt":
    return _mpt_config(hf, path)
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise ValueError(f"{path}: hidden_act {act!r} is not supported (SwiGLU needs silu)")
  for key in ("attention_bias", "mlp_bias"):
    if hf.get(key):
      raise ValueError(f"{path}: {key}=true is not supported")
  rope_theta = hf.get("rope_theta")
  rope_scaling = hf.get("rope_scaling")
  if isinstance(hf.get("rope_parameters"), dict):  # Newer transformers configs.
    rope = hf["rope_parameters"]
    rope_theta = rope.get("rope_theta", rope_theta)
    if rope.get("rope_type", "default") != "default":
      rope_scaling = rope
  if rope_scaling:
    raise ValueError(f"{path}: rope scaling {rope_scaling!r} is not supported")
  max_len = int(_require(hf, "max_position_embeddings", path))
  window = hf.get("sliding_window")
  if window is not None and int(window) < max_len:
    raise ValueError(f"{path}: sliding_window {window} < max_position_embeddings {max_len} is not supported")
  dim = int(_require(hf, "hidden_size", path))
  num_heads = int(_require(hf, "num_attention_heads", path))
  return {
    "vocab_size": int(_require(hf, "vocab_size", path)),
    "dim": dim,
    "num_layers": int(_require(hf, "num_hidden_layers", path)),
    "num_heads": num_heads,
    "num_kv_heads": int(hf.get("num_key_value_heads") or num_heads),
    "head_dim": int(hf.get("head_dim") or dim // num_heads),
    "ffw_hidden": int(_require(hf, "intermediate_size", path)),
    "mlp": "swiglu",
    "norm": "rms",
    "norm_eps": float(_require(hf, "rms_norm_eps", path)),
    "rope_theta": float(rope_theta if rope_theta is not None else 10000.0),
    # transformers' LlamaConfig/MistralConfig default: untied.
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "max_seq_len": max_len,
  }


def _mpt_config(hf: dict, path: str) -> dict:
  """MPT (`MptForCausalLM`): ALiBi, fused Wqkv, LayerNorm without bias, exact-GELU MLP, tied
  embeddings. Raises naming a field whose value the project LM does not implement."""
  attn = hf.get("attn_config") or {}
  # (field, its value (transformers' default when absent), the one value implemented here)
  fields = (
    ("no_bias", hf.get("no_bias", True), True),
    ("attn_config.alibi", attn.get("alibi", True), True),
    ("attn_config.qk_ln", attn.get("qk_ln", False), False),
    ("attn_config.clip_qkv", attn.get("clip_qkv"), None),
    ("attn_config.softmax_scale", attn.get("softmax_scale"), None),
  )
  for key, value, implemented in fields:
    if value != implemented:
      raise ValueError(f"{path}: {key}={value!r} is not supported (only {implemented!r})")
  dim, num_heads = int(_require(hf, "d_model", path)), int(_require(hf, "n_heads", path))
  return {
    "vocab_size": int(_require(hf, "vocab_size", path)),
    "dim": dim,
    "num_layers": int(_require(hf, "n_layers", path)),
    "num_heads": num_heads,
    "num_kv_heads": num_heads,
    "head_dim": dim // num_heads,
    "ffw_hidden": int(hf.get("expansion_ratio", 4) * dim),
    "mlp": "gelu_exact",
    "norm": "layer_nobias",
    "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
    "position": "alibi",
    "alibi_bias_max": float(attn.get("alibi_bias_max", 8)),
    "rope_theta": 10000.0,  # unused with ALiBi
    "tie_embeddings": True,  # MptForCausalLM ties lm_head to wte
    "max_seq_len": int(_require(hf, "max_seq_len", path)),
  }


def config_to_hf(lm_config: dict) -> dict:
  """HF `config.json` dict (LlamaForCausalLM) for an LM config dict."""
  if lm_config["mlp"] != "swiglu" or lm_config["norm"] != "rms":
    raise ValueError(
      f"only mlp=swiglu, norm=rms LMs have a HF Llama layout, got "
      f"mlp={lm_config['mlp']!r}, norm={lm_config['norm']!r}"
    )
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": lm_config["vocab_size"],
    "hidden_size": lm_config["dim"],
    "num_hidden_layers": lm_config["num_layers"],
    "num_attention_heads": lm_config["num_heads"],
    "num_key_value_heads": lm_config["num_kv_heads"],
    "head_dim": lm_config["head_dim"],
    "intermediate_size": lm_config["ffw_hidden"],
    "hidden_act": "silu",
    "rms_norm_eps": lm_config["norm_eps"],
    "rope_theta": lm_config["rope_theta"],
    "rope_scaling": None,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": lm_config["tie_embeddings"],
    "max_position_embeddings": lm_config["max_seq_len"],
  }


def open_safetensors(path: str):
  """`safe_open(path)` (numpy); a truncated or foreign file is a ValueError naming it."""
  try:
    return safe_open(path, framework="np")
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own error types)
    raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def weight_files(directory: str) -> dict[str, str]:
  """`{tensor name: safetensors file path}` of a checkpoint directory.

  Raises:
    FileNotFoundError: neither a single file nor an index is present, or a listed shard.
    KeyError: the index lists a tensor that its shard does not hold (named).
  """
  index_path = os.path.join(directory, INDEX_FILE)
  single_path = os.path.join(directory, SINGLE_FILE)
  if os.path.exists(index_path):
    with open(index_path) as f:
      weight_map = json.load(f)["weight_map"]
    for key, shard in weight_map.items():
      if not os.path.exists(os.path.join(directory, shard)):
        raise FileNotFoundError(f"{index_path}: shard {shard} (of tensor {key}) does not exist")
    files = {}
    for shard in sorted(set(weight_map.values())):
      shard_path = os.path.join(directory, shard)
      with open_safetensors(shard_path) as f:
        held = set(f.keys())
      for key in held:
        if weight_map.get(key, shard) != shard:
          raise KeyError(f"{shard_path}: tensor {key} is mapped to {weight_map[key]} by {index_path}")
        files[key] = shard_path
    for key, shard in weight_map.items():
      if key not in files:
        raise KeyError(f"{index_path}: tensor {key} is not in shard {shard}")
    return files
  if os.path.exists(single_path):
    with open_safetensors(single_path) as f:
      return {key: single_path for key in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
  raise FileNotFoundError(f"{directory}: neither {SINGLE_FILE} nor {INDEX_FILE} exists")


def load_hf_lm(directory: str, dtype=np.float32) -> tuple[dict, dict]:
  """Reads a HF Llama-family checkpoint directory.

  Returns:
    (lm_config, params) as `gguf_lm.load_gguf_lm`: Haiku-style numpy params of `dtype`.

  Raises:
    KeyError: missing config field, missing or extra tensor (named).
    ValueError: a tensor of the wrong shape (named), an unsupported config.
  """
  directory = str(directory)
  config_path = os.path.join(directory, CONFIG_FILE)
  with open(config_path) as f:
    hf = json.load(f)
  config = config_from_hf(hf, config_path)
  table = names.MPT_TABLE if hf["model_type"] == "mpt" else names.HF_TABLE
  files = weight_files(directory)
  with contextlib.ExitStack() as stack:
    handles = {}

    def read(name):
      path = files[name]
      if path not in handles:
        handles[path] = stack.enter_context(open_safetensors(path))
      return handles[path].get_tensor(name)

    params = names.convert(table, files, read, config, dtype, directory)
  return config, params


def save_hf_lm(directory: str, lm_config: dict, params: dict, shard_size: int | None = None):
  """Writes project LM params as a HF Llama checkpoint (`config.json` + safetensors).

  Args:
    directory: output directory (created if needed).
    lm_config: LM config dict.
    params: Haiku-style LM params (the `lm/embed`, `lm/layers`, `lm/final_norm` and, untied,
      `lm/unembed` modules; nothing else).
    shard_size: None for one `model.safetensors`; else the largest shard in bytes (a tensor
      larger than that gets a shard of its own), written with `model.safetensors.index.json`.
  """
  directory = str(directory)
  os.makedirs(directory, exist_ok=True)
  tensors = names.to_source_tensors(names.HF_TABLE, params, lm_config)
  hf = config_to_hf(lm_config)
  hf["torch_dtype"] = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}.get(
    str(next(iter(tensors.values())).dtype), "float32"
  )
  with open(os.path.join(directory, CONFIG_FILE), "w") as f:
    json.dump(hf, f, indent=2)
  metadata = {"format": "pt"}
  if shard_size is None:
    st_numpy.save_file(tensors, os.path.join(directory, SINGLE_FILE), metadata=metadata)
    return
  shards, current, size = [], {}, 0
  for name, w in tensors.items():
    if current and size + w.nbytes > shard_size:
      shards.append(current)
      current, size = {}, 0
    current[name] = w
    size += w.nbytes
  shards.append(current)
  weight_map = {}
  for k, shard in enumerate(shards):
    filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    st_numpy.save_file(shard, os.path.join(directory, filename), metadata=metadata)
    weight_map.update({name: filename for name in shard})
  index = {"metadata": {"total_size": int(sum(w.nbytes for w in tensors.values()))}, "weight_map": weight_map}
  with open(os.path.join(directory, INDEX_FILE), "w") as f:
    json.dump(index, f, indent=2)
