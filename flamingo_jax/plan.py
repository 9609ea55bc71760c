"""Per-device memory plan of a Flamingo training config, from shapes only (nothing is allocated).

    python -m flamingo_jax.plan --config configs/flamingo.py:size=80b --devices 1536 --hbm_gib 32
    python -m flamingo_jax.plan --config configs/flamingo.py:size=9b --devices 512 --mesh fsdp=128,tensor=4
    python -m flamingo_jax.plan --config configs/flamingo.py:size=3b --devices 256 --json

Parameters come from `jax.eval_shape` of the model's init; each leaf's per-device shard follows its
PartitionSpec from the config's sharding rules (`parallel/sharding.py`) over an abstract mesh of the
given axis sizes (`--mesh`, or the config's `mesh.shape` with -1 resolved against `--devices`).

Rows (bytes per device; `c` = compute-dtype bytes, fp32 = 4; `t` = the 'tensor' axis size; `d` =
'data' x 'fsdp', the batch shards; each dataset's per-device micro-batch is `b = ceil(B / d / k)` for
global batch B and k micro-batches). The total is `persistent + max(backward pass, optimizer update)`:
- persistent, the step's (donated) arguments:
  - frozen params: compute dtype (`train/setup.py: cast_frozen`), sharded by the rules;
  - trainable params: fp32, sharded by the rules;
  - optimizer state: AdamW mu and nu, 2 x the trainable params (sharded like them);
  - batch inputs: every dataset's per-device share of the global batch (`images` fp32 dominate).
- backward pass:
  - gradients: (number of datasets + 1) fp32 copies of the trainable params: each dataset's gradient
    (kept until the lambda-weighted sum of `train/step.py`) and the micro-batch gradient in flight;
  - weight copies: the compute-dtype casts of the trainable weights (`layers.matmul` casts inside the
    differentiated function, so they are saved for the backward pass); one scan step's slice of the
    decoder weights (`every` layers, fp32); with 'fsdp' > 1, one decoder layer all-gathered (c bytes)
    and one xattn block (fp32, with its gradient). (No fp32 copy of the frozen weights: XLA 0.10 casts
    inside the layer loop; the reduced paper sizes of tests/test_plan.py agree within 7%.)
  - activations of every dataset: the datasets' forward/backward passes are independent computations
    that XLA may interleave (on CPU it does), so all are counted (`activation_bytes`).
- optimizer update: 4 fp32 copies of the trainable params (gradient, clipped gradient, new moments and
  update before they are written back in place of the donated state).
The constants (buffer counts, 6 fp32 [T, D] per recomputed layer, ...) are those of XLA's buffer
assignment for this step; `tests/test_plan.py` holds the plan to XLA's `memory_analysis()` of the
compiled step within 25% (measured: within 6%, docs/TPU.md "Memory plan").

Activations of one micro-batch (per device, `b` examples of T tokens and N media of F frames):
- vision encoder (frozen, under `stop_gradient`): nothing is saved; forward working set = 3 x its
  largest feature map, for b*N*F images (in c bytes). It is not live at the same time as the rest.
- resampler (trainable, never rematerialised): per media item and layer, in bytes,
    4*(F*Lv*Dr + 6*R*Dr + H/t*R*K + R*Hid/t) + c*(K*Dr + 2*K*I/t + 2*R*I/t + 2*R*Dr + R*Hid/t) + R*Hid/t
  (K = F*Lv + R keys, I = heads x head dim, Hid = the FFW width): media layer norm, latent stream and
  norms, attention probabilities, FFW pre-activations in fp32; keys/values input, k, v, q, attention
  output, normalised inputs of the trained matmuls and the squared FFW activations in c bytes; the ReLU mask.
- LM, per token, with D width, Fm the MLP width (2x for SwiGLU), Q = Hq*dh, KV = Hkv*dh, Ix/Mx the
  xattn inner/FFW widths, L layers, X blocks, G groups (`every` layers + one block, scanned):
    dots_layer = 4*((Q + 2*KV + Fm)/t + 2*D)       q, k, v, MLP-in outputs; o, down outputs (fp32)
    dots_block = 4*((Ix + Mx)/t + 2*D)
    work_layer = 6*4*D + c*(Q + 2*KV)/t + (4 + c)*Hq/t*T + 4*Fm/t    one layer recomputed under remat:
    work_block = 4*4*D + c*(2*D + 2*Ix/t) + (4 + c)*Hx/t*N*R + (4 + c)*Mx/t     residual stream and
                 norms, roped q/k, v, softmax, MLP input (XLA fuses the rest into the backward)
    keep_layer = 4*(6*D + m*F/t) + c*(F/t + (Q + 2*KV)/t + 3*Q/t + 2*D) + (4 + c)*Hq/t*T
    keep_block = 4*(8*D + Mx/t) + c*(Mx/t + 3*D + 2*Ix/t) + Mx/t + (4 + c)*Hx/t*N*R
                 everything autodiff keeps without remat (m = 5 fp32 GELU residuals, 4 for SwiGLU)
  remat 'dots': L*dots_layer + X*dots_block + G*4*D saved (policy `dots_with_no_batch_dims_saveable`:
                every matmul output without batch dims, plus the scan carry), + one group's working set
                every*work_layer + work_block;
  remat 'full': G*4*D saved (each group's input) + one group recomputed whole:
                every*(work_layer + dots_layer) + work_block + dots_block;
  remat 'none': L*keep_layer + X*keep_block.
  Plus the media keys/values of all blocks, 2 x X*N*R*Ix/t fp32 per example, and the logits: 3 x
  (V/t + E) fp32 per token (logits, log-softmax, their gradient) of all T tokens, or of `loss_chunk`
  per example when the loss forms them a chunk at a time.
Activations are split over the batch shards `d`: the model places its residual stream by the training
set-up's logical constraint (`parallel/logical.py`), without which XLA replicates them over 'fsdp'.
"""

import json
import math
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P
from ml_collections import config_flags

from flamingo_jax.models import clip_vit, flamingo, gated_xattn, nfnet
from flamingo_jax.parallel import mesh as mesh_lib
from flamingo_jax.parallel import sharding as sharding_lib
from flamingo_jax.train import setup as setup_lib

GIB = 2**30
F32 = 4
PERSISTENT = ("frozen", "trainable", "optimizer", "batch")  # the step's (donated) arguments
BACKWARD = ("gradients", "weight_copies", "activations")  # live together in the backward pass
UPDATE_BUFFERS = 4


# ------------------------------------------------------------------------------------------- params
def abstract_params(config):
  """(trainable, frozen) params as `jax.ShapeDtypeStruct` trees, frozen in the compute dtype."""
  return setup_lib.split_params(config, flamingo.param_shapes(config.model))


def parse_mesh(text: str) -> dict:
  """'data=3,fsdp=64,tensor=8' -> {'data': 3, 'fsdp': 64, 'tensor': 8}."""
  out = {}
  for item in filter(None, text.split(",")):
    name, sep, value = item.partition("=")
    if not sep or not re.fullmatch(r"-?\d+", value.strip()):
      raise ValueError(f"--mesh item {item!r}: expected axis=size, e.g. fsdp=64,tensor=8")
    out[name.strip()] = int(value)
  return out


def mesh_sizes(shape: Mapping[str, int], devices: int) -> dict:
  """Axis name -> size in `MESH_AXES` order, -1 resolved against `devices`."""
  names, sizes = mesh_lib.resolve_mesh_shape(shape, devices)
  return dict(zip(names, sizes))


def shard_shape(shape, spec: P, sizes: Mapping[str, int]) -> tuple:
  """The per-device block of an array of `shape` laid out by `spec` on axes of `sizes`."""
  out = list(shape)
  for dim, entry in enumerate(spec):
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    out[dim] = math.ceil(out[dim] / math.prod(sizes.get(a, 1) for a in axes))
  return tuple(out)


def sharded_bytes(tree, rules, sizes: Mapping[str, int], dtype=None) -> int:
  """Bytes per device of a params tree (shapes), each leaf sharded by `rules` (in `dtype` if given)."""
  mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
  specs = sharding_lib.partition_specs(tree, rules, mesh)
  total = 0
  for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    itemsize = jnp.dtype(dtype or leaf.dtype).itemsize
    total += math.prod(shard_shape(leaf.shape, spec, sizes)) * itemsize
  return total


def _select(tree, pattern: str):
  return {m: d for m, d in tree.items() if re.search(pattern, m)}


# -------------------------------------------------------------------------------------- activations
def _div(n: int, t: int) -> float:
  """n split over the tensor axis when it divides, else replicated."""
  return n / t if n % t == 0 else n


def vision_grid(variant: str, image_size: int) -> tuple[int, int, int]:
  """(Lv visual tokens per image, Dv their width, elements of the encoder's largest activation)."""
  lib = clip_vit if variant in clip_vit.VARIANTS else nfnet
  return (
    lib.grid_size(variant, image_size),
    lib.output_dim(variant),
    lib.largest_activation(variant, image_size),
  )


def activation_bytes(model_cfg, dataset: Mapping[str, Any], b: int, tensor: int, loss_chunk: int = 0) -> dict:
  """Per-device activation bytes of one micro-batch of `b` examples (formulas: module docstring);
  `loss_chunk` > 0: the logits exist `loss_chunk` positions at a time (`config.loss_chunk`).

  Long: the module docstring's per-module formulas, one line each.
  """
  c = jnp.dtype(flamingo.DTYPES[model_cfg.dtype]).itemsize
  t = tensor
  lm, xa, rs = model_cfg.lm, model_cfg.xattn, model_cfg.resampler
  T, n_media, frames = int(dataset["max_tokens"]), int(dataset["max_images"]), int(dataset["num_frames"])
  grid, dv, largest = vision_grid(model_cfg.vision_variant, int(dataset["image_size"]))
  items, tokens = b * n_media, b * T

  vision = 3 * largest * b * n_media * frames * c

  inner_r, hid_r, R, Dr = rs.num_heads * rs.head_dim, rs.ffw_mult * rs.dim, rs.num_latents, rs.dim
  K = frames * grid + R
  per_layer = (
    F32 * (frames * grid * Dr + 6 * R * Dr + _div(rs.num_heads, t) * R * K + _div(hid_r, t) * R)
    + c * (K * Dr + 2 * K * _div(inner_r, t) + 2 * R * _div(inner_r, t) + 2 * R * Dr + R * _div(hid_r, t))
    + R * _div(hid_r, t)
  )
  resampler = items * (rs.depth * per_layer + c * frames * grid * dv + F32 * frames * grid * Dr)

  D, L, every = lm.dim, lm.num_layers, xa.every
  X = gated_xattn.num_xattn_blocks(L, every, xa.first)
  groups = L // every + (1 if L % every else 0)
  q, kv = lm.num_heads * lm.head_dim, lm.num_kv_heads * lm.head_dim
  fm = lm.ffw_hidden * (2 if lm.mlp == "swiglu" else 1)
  ix, mx = xa.num_heads * xa.head_dim, xa.ffw_mult * D
  dots_layer = F32 * (_div(q + 2 * kv, t) + _div(fm, t) + 2 * D)
  dots_block = F32 * (_div(ix, t) + _div(mx, t) + 2 * D)
  heads_t, xheads_t = _div(lm.num_heads, t), _div(xa.num_heads, t)
  work_layer = 6 * F32 * D + c * _div(q + 2 * kv, t) + (F32 + c) * heads_t * T + F32 * _div(fm, t)
  work_block = (
    4 * F32 * D + c * (2 * D + 2 * _div(ix, t)) + (F32 + c) * xheads_t * n_media * R + (F32 + c) * _div(mx, t)
  )
  f = _div(lm.ffw_hidden, t)
  keep_layer = (
    F32 * (6 * D + (5 if lm.mlp == "gelu" else 4) * f)
    + c * (f + _div(q + 2 * kv, t) + 3 * _div(q, t) + 2 * D)
    + (F32 + c) * heads_t * T
  )
  keep_block = (
    F32 * (8 * D + _div(mx, t))
    + c * (_div(mx, t) + 3 * D + 2 * _div(ix, t))
    + _div(mx, t)
    + (F32 + c) * xheads_t * n_media * R
  )
  remat = model_cfg.remat
  if remat in ("dots", "names"):  # 'names' keeps a subset of the dots' outputs: dots is its upper bound
    per_token = L * dots_layer + X * dots_block + groups * F32 * D + every * work_layer + work_block
  elif remat == "full":
    per_token = groups * F32 * D + every * (work_layer + dots_layer) + work_block + dots_block
  elif remat == "none":
    per_token = L * keep_layer + X * keep_block
  else:
    raise ValueError(f"model.remat must be 'none', 'full', 'dots' or 'names', got {remat!r}")
  media_kv = 2 * X * n_media * R * _div(ix, t) * F32 * b
  lm_bytes = tokens * per_token + media_kv
  logit_tokens = b * min(T, loss_chunk) if loss_chunk else tokens
  logits = 3 * logit_tokens * (_div(lm.vocab_size, t) + lm.num_extra_tokens) * F32
  rest = resampler + lm_bytes + logits
  return dict(
    vision=int(vision),
    resampler=int(resampler),
    lm=int(lm_bytes),
    logits=int(logits),
    total=int(max(vision, rest)),
  )


# --------------------------------------------------------------------------------------------- plan
def make_plan(config, devices: int, hbm_gib: float = 32.0, mesh: Mapping[str, int] | None = None) -> dict:
  """The memory plan of `config` on `devices` chips of `hbm_gib` GiB each (bytes per device).

  Long: the plan's rows (params, optimizer, gradients, activations, batches) as one table.
  """
  sizes = mesh_sizes(mesh if mesh is not None else config.mesh.shape, devices)
  rules = config.sharding.rules
  t = sizes.get("tensor", 1)
  shards = sizes.get("data", 1) * sizes.get("fsdp", 1)
  train_p, frozen_p = abstract_params(config)
  c = jnp.dtype(flamingo.DTYPES[config.model.dtype]).itemsize

  trainable = sharded_bytes(train_p, rules, sizes)
  frozen = sharded_bytes(frozen_p, rules, sizes)
  casts = sharded_bytes(train_p, rules, sizes, config.model.dtype) if c != F32 else 0
  lmc, every = config.model.lm, config.model.xattn.every
  layers = _select(frozen_p, r"^lm/layers$")
  group = every * sharded_bytes(layers, rules, sizes, jnp.float32) // lmc.num_layers
  if sizes.get("fsdp", 1) > 1:  # One decoder layer (c bytes) and one xattn block (fp32 + gradient).
    layer = sharded_bytes(layers, rules, {"tensor": t}) / lmc.num_layers
    block = sharded_bytes(_select(train_p, r"^lm/gated_xattn$"), rules, {"tensor": t})
    group += int(
      layer + 2 * block / gated_xattn.num_xattn_blocks(lmc.num_layers, every, config.model.xattn.first)
    )

  datasets, batch_bytes, warnings = {}, 0, []
  for name in sorted(config.data.datasets):
    ds = config.data.datasets[name]
    k = int(config.train.micro_batches[name])
    global_batch = int(ds.batch_size)
    b = math.ceil(global_batch / shards / k)
    if global_batch % (shards * k):
      warnings.append(
        f"{name}: global batch {global_batch} is not a multiple of {shards} batch shards "
        f"x {k} micro-batches, as the step needs (estimated with b={b} per device)"
      )
    image = int(ds.image_size)
    per_example = (
      int(ds.max_images) * int(ds.num_frames) * image * image * 3 * F32
      + int(ds.max_images)
      + int(ds.max_tokens) * (4 + 4 + 4 + 4 + 1)
    )
    batch_bytes += math.ceil(global_batch / shards) * per_example
    act = activation_bytes(config.model, ds, b, t, config.loss_chunk)
    datasets[name] = dict(
      batch_size=global_batch,
      micro_batches=k,
      per_device=b,
      tokens=int(ds.max_tokens),
      media=int(ds.max_images),
      frames=int(ds.num_frames),
      **act,
    )
  grad_buffers = len(datasets) + 1
  rows = dict(
    frozen=frozen,
    trainable=trainable,
    optimizer=2 * trainable,
    batch=batch_bytes,
    gradients=grad_buffers * trainable,
    weight_copies=casts + group,
    activations=sum(d["total"] for d in datasets.values()),
    update=UPDATE_BUFFERS * trainable,
  )
  persistent = sum(rows[r] for r in PERSISTENT)
  backward = sum(rows[r] for r in BACKWARD)
  total = persistent + max(backward, rows["update"])
  return dict(
    size=config.model.size,
    devices=devices,
    mesh=sizes,
    hbm_gib=hbm_gib,
    dtype=config.model.dtype,
    remat=config.model.remat,
    rows=rows,
    gradient_buffers=grad_buffers,
    datasets=datasets,
    persistent=persistent,
    backward=backward,
    total=total,
    fits=total <= hbm_gib * GIB,
    headroom_gib=hbm_gib - total / GIB,
    warnings=warnings,
  )


def format_table(plan: dict) -> str:
  """The plan as a text table (GiB per device)."""
  mesh = " ".join(f"{k}={v}" for k, v in plan["mesh"].items())
  labels = {
    "frozen": f"frozen params ({plan['dtype']})",
    "trainable": "trainable params (fp32)",
    "optimizer": "optimizer state (AdamW mu, nu)",
    "batch": "batch inputs (all datasets)",
    "gradients": f"gradients ({plan['gradient_buffers']} fp32 buffers)",
    "weight_copies": "weight copies",
    "activations": "activations (all datasets)",
    "update": f"optimizer update ({UPDATE_BUFFERS} fp32 buffers)",
  }
  lines = [
    f"Flamingo {plan['size']} on {plan['devices']} devices (mesh {mesh}), remat={plan['remat']}, "
    f"compute dtype {plan['dtype']}",
    "  GiB per device",
  ]
  row = lambda key: lines.append(f"    {labels[key]:42s} {plan['rows'][key] / GIB:9.3f}")
  lines.append(f"  {'persistent (step arguments)':44s} {plan['persistent'] / GIB:9.3f}")
  for key in PERSISTENT:
    row(key)
  phase = "<- peak" if plan["backward"] >= plan["rows"]["update"] else ""
  lines.append(f"  {'backward pass':44s} {plan['backward'] / GIB:9.3f} {phase}".rstrip())
  for key in BACKWARD:
    row(key)
  phase = "" if phase else "<- peak"
  lines.append(f"  {'optimizer update':44s} {plan['rows']['update'] / GIB:9.3f} {phase}".rstrip())
  verdict = "fits" if plan["fits"] else "DOES NOT FIT"
  lines.append(
    f"  {'total (persistent + peak phase)':44s} {plan['total'] / GIB:9.3f}   {verdict} in "
    f"{plan['hbm_gib']:g} GiB ({100 * plan['total'] / (plan['hbm_gib'] * GIB):.0f}%)"
  )
  lines.append("")
  lines.append(
    f"  {'dataset':8s} {'batch':>6s} {'k':>3s} {'b/dev':>6s} {'T':>5s} {'N':>3s} {'F':>3s} "
    f"{'vision':>8s} {'resampler':>9s} {'lm':>8s} {'logits':>8s} {'total':>8s}  (GiB)"
  )
  for name, d in plan["datasets"].items():
    lines.append(
      f"  {name:8s} {d['batch_size']:6d} {d['micro_batches']:3d} {d['per_device']:6d} "
      f"{d['tokens']:5d} {d['media']:3d} {d['frames']:3d} {d['vision'] / GIB:8.3f} "
      f"{d['resampler'] / GIB:9.3f} {d['lm'] / GIB:8.3f} {d['logits'] / GIB:8.3f} "
      f"{d['total'] / GIB:8.3f}"
    )
  for warning in plan["warnings"]:
    lines.append(f"  warning: {warning}")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI
def main() -> None:
  """`python -m flamingo_jax.plan`; flags are defined here, not at import (other modules use --config)."""
  config = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/flamingo.py:size=80b.")
  devices = flags.DEFINE_integer("devices", None, "Number of accelerator chips.")
  hbm = flags.DEFINE_float("hbm_gib", 32.0, "Memory per chip in GiB (TPU v4: 32).")
  mesh_flag = flags.DEFINE_string(
    "mesh", "", "Mesh axis sizes, e.g. data=3,fsdp=64,tensor=8 (default: the config's mesh.shape)."
  )
  as_json = flags.DEFINE_bool("json", False, "Print JSON instead of a table.")

  def _main(argv):
    del argv
    if config.value is None or devices.value is None:
      raise app.UsageError("--config and --devices are required.")
    mesh = parse_mesh(mesh_flag.value) if mesh_flag.value else None
    plan = make_plan(config.value, devices.value, hbm.value, mesh)
    print(json.dumps(plan, indent=1) if as_json.value else format_table(plan))

  app.run(_main)


if __name__ == "__main__":
  main()
