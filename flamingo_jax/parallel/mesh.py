"""Device meshes from configs, and multi-host initialisation.

A config names its mesh as `config.mesh.shape`: a mapping from mesh axis name to size, e.g.
`{'data': 1, 'fsdp': -1, 'tensor': 2}`. The axes are always laid out in the order of `MESH_AXES`
('data', 'fsdp', 'tensor'), whatever the order of the mapping (ConfigDict sorts its keys); axes the
mapping leaves out are not in the mesh (sharding rules drop them, see `sharding.py`). One size
may be -1: "the rest of the devices".

- `data`: pure data parallelism (parameters replicated, batch split).
- `fsdp`: ZeRO-3 style: batch split *and* parameters / optimizer state sharded, gathered per layer.
- `tensor`: Megatron-style model parallelism: heads / MLP hidden units / vocabulary split.

Nothing here runs at import time. Call `maybe_initialize_distributed` first thing in a `main`,
before any other JAX call, then `create_mesh` / `mesh_from_config`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# The mesh axes, in the order they are laid out (slowest-varying first: 'data' may cross slices over
# DCN, 'tensor' is innermost, on the fastest interconnect).
MESH_AXES = ("data", "fsdp", "tensor")

# Set by launch/tpu.sh on every worker: "this is one process of a multi-host job".
DISTRIBUTED_ENV = "FLAMINGO_DISTRIBUTED"


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Orders the axes as `MESH_AXES`, replaces a -1 by the remaining devices, checks the product.

  Args:
    shape: axis name -> size (a dict or ConfigDict); at most one size is -1.
    num_devices: the number of devices the mesh must cover exactly.

  Returns:
    (axis_names, axis_sizes), both in `MESH_AXES` order.

  Raises:
    ValueError: unknown axis names, bad sizes, more than one -1, or a product != num_devices.
  """
  if not hasattr(shape, "items"):
    raise ValueError(f"mesh.shape must be a mapping axis name -> size, got {shape!r}.")
  items = dict(shape.items())
  if not items:
    raise ValueError(f"mesh.shape is empty; give at least one of the axes {MESH_AXES}.")
  unknown = sorted(set(items) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh.shape has unknown axes {unknown}; known axes: {MESH_AXES}.")
  names = tuple(a for a in MESH_AXES if a in items)
  sizes = []
  for name in names:
    size = items[name]
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ValueError(f"mesh.shape.{name} = {size!r}: sizes must be positive ints or -1.")
    sizes.append(size)
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ValueError(f"mesh.shape {items}: at most one axis may be -1, got {[names[i] for i in free]}.")
  known = math.prod(s for s in sizes if s != -1)
  if free:
    if num_devices % known:
      raise ValueError(
        f"mesh.shape {items}: the fixed axes multiply to {known}, which does not divide the "
        f"{num_devices} devices, so -1 on {names[free[0]]!r} has no integer size."
      )
    sizes[free[0]] = num_devices // known
  elif known != num_devices:
    raise ValueError(
      f"mesh.shape {items} multiplies to {known} devices but jax.device_count() is "
      f"{num_devices}; make the product equal, or set one axis to -1."
    )
  return names, tuple(sizes)


def _device_array(sizes: tuple[int, ...], devices: Sequence[Any]):
  """Lays devices out respecting the TPU topology (ICI within a slice, DCN across slices)."""
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices == 1:
    try:
      return mesh_utils.create_device_mesh(sizes, devices)
    except ValueError:  # E.g. v5e: the logical axes only fit by splitting a physical torus axis.
      return mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
  # Multislice: only the first (outermost) axis crosses the slow DCN links.
  if sizes[0] % num_slices:
    raise ValueError(
      f"{num_slices} TPU slices need the first mesh axis (size {sizes[0]}) to be a "
      "multiple of the number of slices."
    )
  ici = (sizes[0] // num_slices,) + tuple(sizes[1:])
  dcn = (num_slices,) + (1,) * (len(sizes) - 1)
  return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)


def create_mesh(shape: Mapping[str, int], *, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a `Mesh` over all devices (or `devices`) from an axis name -> size mapping.

  Example: `create_mesh({'fsdp': -1, 'tensor': 2})` on 8 devices gives axes ('fsdp', 'tensor')
  with sizes (4, 2). Axis types are `Auto` (shardings propagate through `jit`; no explicit-sharding
  typing of arrays).
  """
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = resolve_mesh_shape(shape, len(devices))
  device_array = _device_array(sizes, devices)
  return Mesh(device_array, names, axis_types=(AxisType.Auto,) * len(names))


def mesh_from_config(config: Any) -> Mesh:
  """`create_mesh(config.mesh.shape)` over all devices of all processes."""
  return create_mesh(config.mesh.shape)


def _truthy(value: str | None) -> bool:
  return value is not None and value.strip().lower() in ("1", "true", "yes", "on")


def _env_int(environ: Mapping[str, str], key: str) -> int | None:
  value = environ.get(key)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"environment variable {key}={value!r} is not an integer.") from None


def maybe_initialize_distributed(
  config: Any = None,
  *,
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  environ: Mapping[str, str] | None = None,
) -> bool:
  """Calls `jax.distributed.initialize` when this process is one of a multi-process job.

  Must run before any other JAX call touches a backend. The job is multi-process when any of:
  - `num_processes > 1` / `coordinator_address` is given as an argument;
  - `config.distributed.enabled` is true (the `distributed` section of a config is optional; when it
    exists it has the fields `enabled`, `coordinator_address`, `num_processes`, `process_id`);
  - the environment has `FLAMINGO_DISTRIBUTED=1` (set by launch/tpu.sh on every TPU VM worker) or
    `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`).
  Missing values are left to JAX's cluster auto-detection (TPU VMs, GKE, SLURM, ...). Arguments win
  over the config, which wins over the environment. On CPU, cross-process collectives use gloo.

  Returns:
    True when JAX runs distributed (initialised now or before), False for a single process.

  Long: each source of the multi-host settings (config, environment, TPU) checked in turn.
  """
  environ = os.environ if environ is None else environ
  if jax.distributed.is_initialized():
    return True
  enabled = False
  section = config.distributed if config is not None and "distributed" in config else None
  if section is not None:
    enabled = bool(section.enabled)
    coordinator_address = coordinator_address or section.coordinator_address
    num_processes = num_processes if num_processes is not None else section.num_processes
    process_id = process_id if process_id is not None else section.process_id
  coordinator_address = coordinator_address or environ.get("JAX_COORDINATOR_ADDRESS") or None
  if num_processes is None:
    num_processes = _env_int(environ, "JAX_NUM_PROCESSES")
  if process_id is None:
    process_id = _env_int(environ, "JAX_PROCESS_ID")
  enabled = (
    enabled
    or _truthy(environ.get(DISTRIBUTED_ENV))
    or coordinator_address is not None
    or (num_processes is not None and num_processes > 1)
  )
  if not enabled or num_processes == 1:
    return False
  platforms = jax.config.jax_platforms or environ.get("JAX_PLATFORMS") or ""
  if platforms.split(",")[0].strip() == "cpu":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info(
    "jax.distributed.initialize(coordinator_address=%s, num_processes=%s, process_id=%s)",
    coordinator_address,
    num_processes,
    process_id,
  )
  jax.distributed.initialize(
    coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
  )
  logging.info(
    "process %d of %d; %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
