"""The frozen LM's pretrained weights inside a Flamingo params tree.

LM sources are spec strings (`flamingo_jax/sources.py` parses and loads them).

The LM owns four modules of the Flamingo tree (docs/ARCHITECTURE.md): `lm/embed`, `lm/layers`,
`lm/final_norm` and, untied, `lm/unembed`. `merge_lm_params` swaps exactly those in. Everything else
(vision encoder, resampler, gated xattn blocks with gates at 0, extra token rows) keeps its
initialisation, so `init_flamingo_with_lm` returns a Flamingo that computes exactly the LM.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax import sources
from flamingo_jax.convert import converted
from flamingo_jax.models import flamingo
from flamingo_jax.models import lm as lm_lib

# The modules of the Flamingo tree that hold the pretrained LM's own weights.
LM_MODULES = converted.LM_MODULES


def check_lm_config(
  source_config: Mapping[str, Any], model_lm_config: Mapping[str, Any], source: str = "LM source"
) -> None:
  """Raises ValueError listing each field where the source LM differs from the model's `lm` config.

  Every field of `source_config` is compared (vocab_size, dim, num_layers, heads, head_dim,
  ffw_hidden, mlp, norm, norm_eps, rope_theta, tie_embeddings, max_seq_len); floats with a
  relative tolerance of 1e-6 (GGUF stores float32).
  """
  model = dict(model_lm_config)
  diffs = []
  for key in sorted(source_config):
    if key not in model:
      diffs.append(f"{key}: source {source_config[key]!r}, model config has no such field")
      continue
    a, b = source_config[key], model[key]
    same = (
      math.isclose(float(a), float(b), rel_tol=1e-6)
      if isinstance(a, float) or isinstance(b, float)
      else a == b
    )
    if not same:
      diffs.append(f"{key}: source {a!r} != model {b!r}")
  if diffs:
    raise ValueError(
      f"{source} does not match config.model.lm:\n  "
      + "\n  ".join(diffs)
      + "\n(pick the matching config.model size or LM source)"
    )


def init_new_token_rows(params: Mapping[str, Mapping[str, Any]], end_id: int) -> dict:
  """A copy of `params` whose new token rows start from the pretrained LM's own rows.

  `<image>` (extra row 0) starts at the mean input embedding and `<EOC>` (extra row 1) at the row of
  the LM's end token `end_id` (input and, when untied, output side), so at the start of training the
  LM already predicts `<EOC>` where it would end a text. From random rows the new-token loss dominates
  the first steps, and the trainable visual path learns an image-independent offset for it (on the
  easy-VQA main job the resampler's output stopped varying with the image within 40 steps).
  """
  out = {module: dict(leaves) for module, leaves in params.items()}
  table = np.asarray(params["lm/embed"]["embeddings"], np.float32)
  extra = np.array(params["lm/extra_embed"]["embeddings"], np.float32)
  extra[0] = table.mean(axis=0)
  extra[1] = table[end_id]
  out["lm/extra_embed"]["embeddings"] = extra.astype(params["lm/extra_embed"]["embeddings"].dtype)
  if "lm/extra_unembed" in params:
    unembed = np.asarray(params["lm/unembed"]["w"], np.float32)
    extra_out = np.array(params["lm/extra_unembed"]["w"], np.float32)
    extra_out[:, 0] = unembed.mean(axis=1)
    extra_out[:, 1] = unembed[:, end_id]
    out["lm/extra_unembed"]["w"] = extra_out.astype(params["lm/extra_unembed"]["w"].dtype)
  return out


def merge_lm_params(
  flamingo_params: Mapping[str, Mapping[str, Any]],
  lm_params: Mapping[str, Mapping[str, Any]],
  *,
  source_config: Mapping[str, Any] | None = None,
  model_lm_config: Mapping[str, Any] | None = None,
  source: str = "LM source",
) -> dict:
  """A copy of `flamingo_params` with the LM modules (`LM_MODULES`) replaced by `lm_params`.

  Every LM module of `flamingo_params` must be in `lm_params` with the same names and shapes, and
  `lm_params` must hold nothing else. Values take the dtype of the leaf they replace. With both
  `source_config` and `model_lm_config`, `check_lm_config` runs first. Leaves of
  `flamingo_params` may be arrays or `jax.ShapeDtypeStruct` (only their shape/dtype are read).

  Raises:
    ValueError: a config mismatch, or a missing / extra / wrongly shaped path (named, with both
      shapes).
  """
  if source_config is not None and model_lm_config is not None:
    check_lm_config(source_config, model_lm_config, source)
  wanted = [m for m in LM_MODULES if m in flamingo_params]
  errors = []
  for module in lm_params:
    if module not in wanted:
      errors.append(
        f"{module}: in the {source} but not an LM module of the Flamingo params (expected {wanted})"
      )
  for module in wanted:
    if module not in lm_params:
      errors.append(f"{module}: missing from the {source}")
      continue
    dst, src = flamingo_params[module], lm_params[module]
    errors += [f"{module}/{n}: missing from the {source}" for n in dst if n not in src]
    errors += [f"{module}/{n}: in the {source} but not in the Flamingo params" for n in src if n not in dst]
    errors += [
      f"{module}/{n}: shape {tuple(np.shape(src[n]))} in the {source}, "
      f"{tuple(dst[n].shape)} in the Flamingo params"
      for n in dst
      if n in src and tuple(np.shape(src[n])) != tuple(dst[n].shape)
    ]
  if errors:
    raise ValueError(f"cannot merge the {source} into the Flamingo params:\n  " + "\n  ".join(errors))
  merged = {m: dict(sub) for m, sub in flamingo_params.items()}
  for module in wanted:
    merged[module] = {
      n: np.asarray(w).astype(flamingo_params[module][n].dtype) for n, w in lm_params[module].items()
    }
  return merged


def lm_config_dict(model_cfg) -> dict:
  """The model config's `lm` section as a plain dict."""
  return dict(model_cfg.lm.to_dict() if hasattr(model_cfg.lm, "to_dict") else model_cfg.lm)


def _lm_module_init(model_cfg):
  """`init(rng, tokens)` of the `lm` module alone (text-only prompts need nothing else).

  The same `DecoderLM(name="lm")` that `models/flamingo.py` assembles, so the paths and shapes are
  those of the full tree's `lm/...` modules (pinned by tests/test_generate.py).
  """
  c = flamingo.parse_configs(model_cfg)

  def forward(tokens):
    return lm_lib.DecoderLM(c.lm, c.xattn, dtype=c.dtype, remat=c.remat, name="lm")(tokens)

  return hk.transform(forward).init


def param_shapes(model_cfg, text_only: bool = False) -> dict:
  """The Flamingo params tree as `jax.ShapeDtypeStruct`s (text_only: the `lm/...` modules only)."""
  if not text_only:
    return flamingo.param_shapes(model_cfg)
  tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  return jax.eval_shape(_lm_module_init(model_cfg), jax.random.PRNGKey(0), tokens)


def init_flamingo_with_lm(
  model_cfg,
  spec: str,
  rng: jax.Array,
  image_shape: Sequence[int] | None = None,
  *,
  text_only: bool = False,
) -> dict:
  """Flamingo params at initialisation with the pretrained LM swapped in (numpy, fp32).

  The gated xattn blocks start with their gates at 0, so the result computes exactly the LM.

  Args:
    model_cfg: `config.model` (see `models/flamingo.py: model_config`).
    spec: LM source (module docstring).
    rng: PRNG key of the Flamingo initialisation.
    image_shape: (H, W, 3) of the images used to trace the init (default: the config's
      image_size); the parameters do not depend on it.
    text_only: return only the `lm/...` modules (all that prompts without images use): skips
      the vision encoder and resampler, whose init compiles for minutes on a small CPU.

  Raises:
    ValueError: the source LM does not match `model_cfg.lm` (every differing field named).
  """
  source = f"LM source {spec!r}"
  source_config, lm_params = sources.load_lm(spec, np.float32)
  check_lm_config(source_config, lm_config_dict(model_cfg), source)
  tokens = jnp.zeros((1, 1), jnp.int32)
  if text_only:
    init, args = _lm_module_init(model_cfg), (tokens,)
  else:
    if image_shape is None:
      image_shape = (model_cfg.image_size, model_cfg.image_size, 3)
    images = jnp.zeros((1, 1, 1) + tuple(image_shape), jnp.float32)
    init, args = flamingo.make_model(model_cfg).init, (images, tokens)
  replaced = set(lm_params)

  def init_rest(key):
    # The LM leaves are not outputs, so XLA never draws their (discarded) random init.
    return {m: sub for m, sub in init(key, *args).items() if m not in replaced}

  shapes = jax.eval_shape(init, rng, *args)
  rest = jax.device_get(jax.jit(init_rest)(rng))
  full = {m: (rest[m] if m in rest else shapes[m]) for m in shapes}
  return merge_lm_params(full, lm_params, source=source)
