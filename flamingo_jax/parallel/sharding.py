"""Sharding as data: `(regex, PartitionSpec)` rules over '/'-joined parameter paths.

A Haiku params tree `{module_path: {name: array}}` has paths such as `lm/layers/q` (see
docs/ARCHITECTURE.md). A rule is a tuple `(regex, spec)` or `(regex, spec, fallback)`:
- `regex` must match the *whole* path (`re.fullmatch`); the first matching rule wins;
- `spec` is a `PartitionSpec` over the mesh axes ('data', 'fsdp', 'tensor'), or a dict
  `{rank: PartitionSpec}` for rules that cover leaves of several ranks (a leaf whose rank is not a
  key does not match the rule, the search goes on: `(r'.*', {0: P()})` is a catch-all for scalars);
- `fallback` ('raise' or 'replicate') overrides the caller's fallback for an indivisible dimension.
An unmatched parameter raises naming it; so does a spec longer than the rank, or a dimension that
the spec's mesh axes do not divide (unless the fallback is 'replicate': that dimension is then
replicated, with a warning in the log). Mesh axes named by a rule but absent from the mesh count
as size 1.

Named rule sets live in `RULE_SETS`; a config refers to one by name (e.g. `config.sharding.rules =
'flamingo'`) and every function here accepts either the name or the rules themselves.

Activation constraints by logical axis names are `logical.py`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flamingo_jax.parallel.mesh import MESH_AXES

Rules = Sequence[tuple]
FALLBACKS = ("raise", "replicate")

# ------------------------------------------------------------------------------------------------
# Default rule sets (parameter layout of docs/ARCHITECTURE.md). Weights are `x @ w`, i.e. [in, out]:
# the input dim goes on 'fsdp', the output dim on 'tensor'; output projections (o, down, ffw_out)
# the reverse, so a Megatron pair (up then down) needs a single reduction. Stacked layer params
# carry a leading layer axis that is never sharded (the layers are scanned over).
_IN_OUT = P("fsdp", "tensor")
_OUT_IN = P("tensor", "fsdp")
_STACKED_IN_OUT = P(None, "fsdp", "tensor")
_STACKED_OUT_IN = P(None, "tensor", "fsdp")
_EMBED = P("tensor", "fsdp")  # [V, D]: vocabulary on 'tensor', embedding on 'fsdp'.
_HWIO = P(None, None, None, "tensor")  # conv kernels: output channels on 'tensor'.

# Leaf names of biases, norms, gains, gates, latents and temporal embeddings: always replicated,
# whatever their rank ([D], stacked [L, D], [R, D]).
_VECTOR = (
  r"(b|bias|offset|scale|gain|[^/]*_(bias|scale|gain|gate)|[^/]*norm[^/]*|[^/]*latent[^/]*"
  r"|[^/]*temporal[^/]*)"
)
_OUT_PROJ = r"(o|down|out|out_proj|[^/]*_out)"  # o, down, ffw_out, mlp_out, ...
# By rank, for modules whose internal layout is not pinned (Haiku Linear / Conv2D defaults).
_GENERIC = {0: P(), 1: P(), 2: _IN_OUT, 3: _STACKED_IN_OUT}
_GENERIC_OUT = {2: _OUT_IN, 3: _STACKED_OUT_IN}

LM_RULES = (
  (r"lm/embed/embeddings", _EMBED),  # [V, D]
  (r"lm/extra_embed/embeddings", P(None, "fsdp")),  # [E, D]; E = 2 rows, never split.
  (r"lm/unembed/w", _IN_OUT),  # [D, V]
  (r"lm/extra_unembed/w", P("fsdp", None)),  # [D, E]
  (r"lm/layers/(q|k|v|gate|up)", _STACKED_IN_OUT),  # [L, D, Hq*dh | Hkv*dh | F]
  (r"lm/layers/(o|down)", _STACKED_OUT_IN),  # [L, Hq*dh | F, D]
  (r"lm/layers/(attn_norm|attn_norm_bias|mlp_norm|mlp_norm_bias)", P()),  # [L, D]
  (r"lm/final_norm/(scale|bias)", P()),  # [D]
  (r"lm/gated_xattn/(q|k|v|ffw_in|ffw_gate_in)", _STACKED_IN_OUT),  # [X, D | Dr, H*dh | F]
  (r"lm/gated_xattn/(o|ffw_out)", _STACKED_OUT_IN),  # [X, H*dh | F, D]
  (r"lm/gated_xattn/(attn_gate|ffw_gate)", P()),  # [X], or [X, D] per channel (IDEFICS)
  (r"lm/gated_xattn/(attn_norm|ffw_norm)_(scale|bias)", P()),  # [X, D]
  (r"lm/gated_xattn/(q_norm|k_norm)", P()),  # [X, dh] (IDEFICS's qk norms)
)
RESAMPLER_RULES = (
  (rf"perceiver_resampler/(.*/)?{_VECTOR}", P()),
  (rf"perceiver_resampler/(.*/)?{_OUT_PROJ}(/w)?", _GENERIC_OUT, "replicate"),
  (r"perceiver_resampler/.*", _GENERIC, "replicate"),
)
# NFNet (frozen in Flamingo): HWIO kernels shard O on 'tensor' when divisible, else replicate.
VISION_RULES = (
  (rf"(.*/)?vision_encoder/(.*/)?{_VECTOR}", P()),
  (r"(.*/)?vision_encoder/.*", {**_GENERIC, 4: _HWIO}, "replicate"),
)
TEXT_ENCODER_RULES = (
  (rf"(.*/)?text_encoder/(.*/)?{_VECTOR}", P()),
  (r"(.*/)?text_encoder/(.*/)?pos[^/]*(/embeddings)?", P()),  # [T, D] position embeddings.
  (r"(.*/)?text_encoder/(.*/)?[^/]*embed[^/]*(/embeddings)?", {2: _EMBED}, "replicate"),
  (rf"(.*/)?text_encoder/(.*/)?{_OUT_PROJ}(/w)?", _GENERIC_OUT, "replicate"),
  (r"(.*/)?text_encoder/.*", _GENERIC, "replicate"),
)
# Contrastive heads: projections to the shared space; the log inverse temperature is a scalar.
PROJECTION_RULES = (
  (r"(.*/)?[^/]*proj[^/]*/(b|bias)", P()),
  (r"(.*/)?[^/]*proj[^/]*/w", {2: _IN_OUT}, "replicate"),
)
SCALAR_RULES = ((r".*", {0: P()}),)  # Catch-all for scalars only: anything else must be claimed.

FLAMINGO_RULES = LM_RULES + RESAMPLER_RULES + VISION_RULES + SCALAR_RULES
CONTRASTIVE_RULES = VISION_RULES + TEXT_ENCODER_RULES + PROJECTION_RULES + SCALAR_RULES
REPLICATED_RULES = ((r".*", P()),)  # Everything replicated (single device, debugging).

RULE_SETS = {
  "flamingo": FLAMINGO_RULES,
  "contrastive": CONTRASTIVE_RULES,
  "replicated": REPLICATED_RULES,
}


# ------------------------------------------------------------------------------------------------
def path_str(key_path) -> str:
  """A JAX key path as a '/'-joined string: `lm/layers/q`, `0/mu/lm/layers/q`."""
  return jax.tree_util.keystr(tuple(key_path), simple=True, separator="/")


def tree_paths(tree: Any) -> Any:
  """The tree with every leaf replaced by its '/'-joined path."""
  return jax.tree_util.tree_map_with_path(lambda kp, _: path_str(kp), tree)


def get_rules(rules: str | Rules) -> tuple:
  """A rule set by name (a key of `RULE_SETS`), or the given rules, checked."""
  if isinstance(rules, str):
    if rules not in RULE_SETS:
      raise ValueError(f"unknown sharding rule set {rules!r}; known: {sorted(RULE_SETS)}.")
    rules = RULE_SETS[rules]
  rules = tuple(rules)
  for i, rule in enumerate(rules):
    if not isinstance(rule, (tuple, list)) or len(rule) not in (2, 3):
      raise ValueError(f"sharding rule #{i} {rule!r}: expected (regex, spec) or (regex, spec, fallback).")
    regex, spec = rule[0], rule[1]
    if not isinstance(regex, str):
      raise ValueError(f"sharding rule #{i}: regex must be a str, got {regex!r}.")
    try:
      re.compile(regex)
    except re.error as e:
      raise ValueError(f"sharding rule #{i}: bad regex {regex!r}: {e}") from None
    specs = spec.values() if isinstance(spec, Mapping) else [spec]
    if not all(isinstance(s, P) for s in specs):
      raise ValueError(
        f"sharding rule #{i} ({regex!r}): spec must be a PartitionSpec or a "
        f"dict rank -> PartitionSpec, got {spec!r}."
      )
    if len(rule) == 3 and rule[2] not in FALLBACKS:
      raise ValueError(
        f"sharding rule #{i} ({regex!r}): fallback must be one of {FALLBACKS}, got {rule[2]!r}."
      )
  return rules


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


def entry_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of them)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _match(path: str, rank: int, rules: tuple) -> tuple[P, str | None]:
  """The spec of the first rule that matches `path` (and `rank`, for rank-keyed specs)."""
  for rule in rules:
    if not re.fullmatch(rule[0], path):
      continue
    spec = rule[1]
    if isinstance(spec, Mapping):
      if rank not in spec:
        continue
      spec = spec[rank]
    return spec, (rule[2] if len(rule) == 3 else None)
  return None, None


def check_spec(name: str, shape: Sequence[int], spec: P, mesh: Mesh, *, fallback: str = "raise") -> P:
  """Validates `spec` for an array `shape` on `mesh`; returns it over the mesh's axes only.

  Args:
    name: what to call the array in errors (a parameter path).
    shape: the array's shape.
    spec: the wanted PartitionSpec.
    mesh: the mesh (axes the spec names but the mesh lacks are dropped: size 1).
    fallback: 'raise' on an indivisible dimension, or 'replicate' it and log a warning.

  Raises:
    ValueError: spec longer than the rank, an unknown or repeated mesh axis, or (fallback 'raise')
      a dimension that the product of its mesh axes does not divide.
  """
  if fallback not in FALLBACKS:
    raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}.")
  shape = tuple(shape)
  if len(spec) > len(shape):
    raise ValueError(
      f"parameter {name!r}: spec {spec} has {len(spec)} entries but the array has "
      f"rank {len(shape)} (shape {shape})."
    )
  mesh_sizes = dict(mesh.shape)
  used, entries = set(), []
  for dim, entry in enumerate(spec):
    axes = entry_axes(entry)
    unknown = [a for a in axes if a not in mesh_sizes and a not in MESH_AXES]
    if unknown:
      raise ValueError(
        f"parameter {name!r}: spec {spec} names unknown mesh axes {unknown}; "
        f"the mesh has {tuple(mesh_sizes)}."
      )
    axes = tuple(a for a in axes if a in mesh_sizes)
    if used & set(axes):
      raise ValueError(
        f"parameter {name!r}: spec {spec} uses mesh axes {sorted(used & set(axes))} "
        "on more than one dimension."
      )
    size = math.prod(mesh_sizes[a] for a in axes)
    if shape[dim] % size:
      msg = (
        f"parameter {name!r}: dim {dim} of shape {shape} (size {shape[dim]}) is not divisible "
        f"by mesh axes {axes} (size {size})"
      )
      if fallback == "raise":
        raise ValueError(msg + "; change the rule or the mesh, or use fallback='replicate'.")
      logging.warning("%s; replicating that dimension.", msg)
      axes = ()
    used |= set(axes)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def partition_specs(params_or_shapes: Any, rules: str | Rules, mesh: Mesh, *, fallback: str = "raise") -> Any:
  """A PartitionSpec per leaf of a params tree (arrays or `jax.ShapeDtypeStruct`s).

  Args:
    params_or_shapes: e.g. Haiku params `{module_path: {name: array}}` or `jax.eval_shape` of them.
    rules: a rule set name (key of `RULE_SETS`) or `[(regex, spec[, fallback]), ...]`.
    mesh: the mesh the specs are checked against.
    fallback: default for rules without their own: 'raise' or 'replicate' on indivisible dims.

  Returns:
    A tree of `PartitionSpec` with the structure of `params_or_shapes`.

  Raises:
    ValueError: naming the parameter that no rule matches or whose spec does not fit.
  """
  rules = get_rules(rules)

  def one(key_path, leaf):
    name, shape = path_str(key_path), _shape(leaf)
    spec, rule_fallback = _match(name, len(shape), rules)
    if spec is None:
      raise ValueError(
        f"parameter {name!r} (shape {shape}) matches no sharding rule; add a "
        "(regex, PartitionSpec) rule for it."
      )
    return check_spec(name, shape, spec, mesh, fallback=rule_fallback or fallback)

  return jax.tree_util.tree_map_with_path(one, params_or_shapes)


def named_shardings(tree: Any, rules: str | Rules, mesh: Mesh, *, fallback: str = "raise") -> Any:
  """`partition_specs` wrapped into `NamedSharding(mesh, spec)`: ready for `jit`/`device_put`."""
  specs = partition_specs(tree, rules, mesh, fallback=fallback)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs)


def optimizer_state_shardings(opt_state_shapes: Any, param_specs: Any, mesh: Mesh) -> Any:
  """Shardings of an optax state whose leaves mirror the params (mu, nu, ...).

  A state leaf whose path ends with a parameter's path (e.g. `0/mu/lm/layers/q` ends with
  `lm/layers/q`) gets that parameter's spec (the longest matching suffix wins); other scalars
  (counts, injected hyper-parameters) are replicated.

  Args:
    opt_state_shapes: the optax state, or `jax.eval_shape` of its `init`.
    param_specs: tree of `PartitionSpec` (or `NamedSharding`) over the params, as from
      `partition_specs`.
    mesh: the mesh.

  Returns:
    A tree of `NamedSharding` with the structure of `opt_state_shapes`.

  Raises:
    ValueError: a non-scalar state leaf that mirrors no parameter, or a spec that does not fit it.
  """
  by_path = {}
  for key_path, spec in jax.tree_util.tree_flatten_with_path(
    param_specs, is_leaf=lambda x: isinstance(x, (P, NamedSharding))
  )[0]:
    by_path[path_str(key_path)] = spec.spec if isinstance(spec, NamedSharding) else spec

  def one(key_path, leaf):
    name, shape = path_str(key_path), _shape(leaf)
    parts = name.split("/")
    for i in range(len(parts)):
      suffix = "/".join(parts[i:])
      if suffix in by_path:
        return NamedSharding(mesh, check_spec(name, shape, by_path[suffix], mesh))
    if not shape:
      return NamedSharding(mesh, P())
    raise ValueError(
      f"optimizer state leaf {name!r} (shape {shape}) mirrors no parameter path; "
      "its path must end with the path of a parameter."
    )

  return jax.tree_util.tree_map_with_path(one, opt_state_shapes)
