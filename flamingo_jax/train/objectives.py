"""Pluggable objectives of the one training loop: Flamingo next-token NLL and stage-1 contrastive.

An objective knows its model and turns (params, one micro-batch, rng) into a weighted loss sum:

    loss_sum(params, batch, rng) -> (sum [], weight [], metrics)

The step divides the summed losses by the summed weights over micro-batches, so k micro-batches give
exactly the gradient of the single large batch when the loss is a sum over tokens (Flamingo: the weight
is the number of target tokens). The contrastive loss is a batch-level quantity (negatives come from the
batch): its weight is 1 per micro-batch, so accumulation averages micro-batch losses.

Batches follow docs/ARCHITECTURE.md ("Batches"): images [B,N,F,H,W,3], tokens/targets/loss_mask/
media_index/token_mask [B,T].
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flamingo_jax.models import contrastive as contrastive_lib
from flamingo_jax.models import flamingo, layers
from flamingo_jax.models import lm as lm_lib


@jax.custom_vjp
def _masked_nll_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * (logsumexp(logits) - logits[target])); logits fp32 [B,T,V], targets int [B,T]."""
  return _nll_forward(logits, targets, mask)[0]


def _nll_forward(logits, targets, mask):
  lse = jax.nn.logsumexp(logits, axis=-1)
  nll = lse - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask), (logits, lse, nll, targets, mask)


def _nll_backward(residuals, g):
  # d/dlogits = softmax - onehot(target), written as one elementwise pass over [B,T,V]: no
  # softmax, scatter or broadcast buffers of the vocabulary's size besides the gradient itself.
  logits, lse, nll, targets, mask = residuals
  onehot = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
  d_logits = (jnp.exp(logits - lse[..., None]) - onehot) * (g * mask)[..., None]
  d_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)
  return d_logits.astype(logits.dtype), d_targets, g * nll


_masked_nll_sum.defvjp(_nll_forward, _nll_backward)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array):
  """Sum of masked next-token NLL and the token count, in fp32. logits [B,T,V]; targets, mask [B,T].

  Its gradient is computed in one pass (a custom VJP), which keeps the step's peak memory to the
  logits and their gradient (benchmarks/README.md)."""
  mask = mask.astype(jnp.float32)
  total = _masked_nll_sum(logits.astype(jnp.float32), targets.astype(jnp.int32), mask)
  return total, jnp.sum(mask)


def chunked_token_nll(head: lm_lib.Head, targets: jax.Array, mask: jax.Array, chunk: int, dtype):
  """`token_nll` of the logits of `head` (hidden [B, T, D]) without a [B, T, V+E] buffer.

  The logits are formed `chunk` positions at a time inside a scan, and each chunk is rematerialised in
  the backward pass: the largest vocabulary-sized buffer is [B, chunk, V+E] (MaxText's vocabulary
  tiling does the same along the other axis). T is padded to a multiple of `chunk` with masked rows."""
  b, t, d = head.hidden.shape
  pad = -t % chunk
  mask = mask.astype(jnp.float32)
  hidden, targets, flags = (
    jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2)) for x in (head.hidden, targets, mask)
  )

  def split(x):  # [B, T', ...] -> [T'/chunk, B, chunk, ...]
    return jnp.moveaxis(x.reshape(b, -1, chunk, *x.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_nll(w_out, w_extra, h, tgt, m):
    logits = lm_lib.head_logits(lm_lib.Head(h, w_out, w_extra), dtype)
    return _masked_nll_sum(logits, tgt.astype(jnp.int32), m)

  def body(total, xs):
    return total + chunk_nll(head.w_out, head.w_extra, *xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (split(hidden), split(targets), split(flags)))
  return total, jnp.sum(mask)


def output_nll(output_fn, targets: jax.Array, mask: jax.Array, loss_chunk: int, dtype):
  """(summed NLL, token count) of a model call `output_fn(output)` -> logits or `Head`: chunked
  (`chunked_token_nll`) when `loss_chunk` > 0, from the whole logits (`token_nll`) otherwise."""
  if loss_chunk:
    return chunked_token_nll(output_fn("head_inputs"), targets, mask, loss_chunk, dtype)
  return token_nll(output_fn("logits"), targets, mask)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A model and its loss. `init(rng, batch) -> params`; `param_metrics(params) -> dict`."""

  name: str
  init: Callable[[jax.Array, dict], Any]
  loss_sum: Callable[[Any, dict, jax.Array], tuple]
  param_metrics: Callable[[Any], dict]


# How a dataset's summed NLL is normalised: by its target tokens, or by its sequences (paper Eq. 2:
# the expected NLL of a whole sequence, so a 256-token M3W document weighs ~10-20x a 12-20-token pair).
NORMALISATIONS = ("per_token_mean", "per_sequence_sum")


def flamingo_objective(
  model_cfg, constrain=layers.no_constraint, normalisation: str = "per_token_mean", loss_chunk: int = 0
) -> Objective:
  """The NLL of the text given the interleaved media, normalised by `normalisation` (one of
  NORMALISATIONS); `constrain` places activations (`flamingo.make_model`); `loss_chunk` > 0 forms the
  logits that many positions at a time (`chunked_token_nll`), 0 all at once."""
  if normalisation not in NORMALISATIONS:
    raise ValueError(f"loss_normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
  model = flamingo.make_model(model_cfg, constrain)

  def init(rng, batch):
    return model.init(rng, batch["images"], batch["tokens"])

  if loss_chunk < 0:
    raise ValueError(f"loss_chunk must be >= 0 (0: no chunking), got {loss_chunk}")
  dtype = model.configs.dtype

  def loss_sum(params, batch, rng):
    inputs = (batch["images"], batch["tokens"], batch["media_index"], batch["token_mask"])
    output_fn = lambda output: model.forward(params, rng, *inputs, is_training=True, output=output)
    total, count = output_nll(output_fn, batch["targets"], batch["loss_mask"], loss_chunk, dtype)
    if normalisation == "per_sequence_sum":
      count = jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=1)).astype(jnp.float32)
    return total, count, {}

  def param_metrics(params):
    """tanh of every gate: how far each xattn block has opened (paper Fig. 6)."""
    out = {}
    block = params.get("lm/gated_xattn", {})
    for gate in ("attn_gate", "ffw_gate"):
      if gate in block:
        values = jnp.tanh(block[gate].astype(jnp.float32))
        for i in range(values.shape[0]):
          out[f"gate/{gate.split('_')[0]}_{i}"] = values[i]
    return out

  return Objective("flamingo", init, loss_sum, param_metrics)


def contrastive_objective(model_cfg, special_ids=()) -> Objective:
  """Stage 1: NFNet + text tower on image-text pairs. Uses the pairs batch format; the text tower reads
  the caption tokens only (token_mask without the ids in `special_ids`, e.g. <image>, <EOC>, BOS, EOS)."""
  model = contrastive_lib.make_contrastive_model(model_cfg, dtype=flamingo.DTYPES[model_cfg.dtype])
  special = jnp.asarray(list(special_ids) or [-1], jnp.int32)

  def inputs(batch):
    images = batch["images"][:, 0, 0]  # [B, H, W, 3]
    tokens = batch["tokens"]
    text_mask = batch["token_mask"] & ~jnp.isin(tokens, special)
    valid = jnp.any(text_mask, axis=1) & batch["media_mask"][:, 0]
    return images, tokens, text_mask, valid

  def init(rng, batch):
    images, tokens, text_mask, _ = inputs(batch)
    return model.init(rng, images, tokens, text_mask, False)

  def loss_sum(params, batch, rng):
    images, tokens, text_mask, valid = inputs(batch)
    out = model.apply(params, rng, images, tokens, text_mask, True)
    loss, metrics = contrastive_lib.contrastive_loss(
      out["image_embed"],
      out["text_embed"],
      out["logit_scale"],
      valid,
      label_smoothing=model_cfg.label_smoothing,
      terms=model_cfg.loss_terms,
    )
    return loss, jnp.ones((), jnp.float32), {k: v for k, v in metrics.items() if k != "loss"}

  def param_metrics(params):
    return {}

  return Objective("contrastive", init, loss_sum, param_metrics)


def make_objective(config, special_ids=(), constrain=layers.no_constraint) -> Objective:
  """The objective `config.objective` names; `constrain` (Flamingo only) places its activations."""
  if config.objective == "flamingo":
    return flamingo_objective(config.model, constrain, config.loss_normalisation, config.loss_chunk)
  if config.objective == "contrastive":
    return contrastive_objective(config.model, special_ids)
  raise ValueError(f"config.objective must be 'flamingo' or 'contrastive', got {config.objective!r}")
