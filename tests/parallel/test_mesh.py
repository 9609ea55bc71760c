"""Tests of flamingo_jax.parallel.mesh on the 8 simulated CPU devices (see tests/conftest.py)."""

import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest

from flamingo_jax.parallel import mesh as mesh_lib


def test_one_axis_mesh():
  mesh = mesh_lib.create_mesh({"data": 8})
  assert mesh.axis_names == ("data",)
  assert mesh.devices.shape == (8,)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_three_axis_mesh_in_canonical_order():
  # ConfigDict sorts its keys; the mesh axes still come out as ('data', 'fsdp', 'tensor').
  shape = ml_collections.ConfigDict({"tensor": 2, "data": 2, "fsdp": 2})
  mesh = mesh_lib.create_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert mesh.devices.shape == (2, 2, 2)
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize(
  "shape, names, sizes",
  [
    ({"data": -1}, ("data",), (8,)),
    ({"data": -1, "tensor": 2}, ("data", "tensor"), (4, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 2}, ("data", "fsdp", "tensor"), (1, 4, 2)),
  ],
)
def test_minus_one_takes_the_rest(shape, names, sizes):
  mesh = mesh_lib.create_mesh(shape)
  assert mesh.axis_names == names
  assert mesh.devices.shape == sizes


def test_mesh_from_config_and_device_subset():
  config = ml_collections.ConfigDict({"mesh": {"shape": {"fsdp": -1, "tensor": 2}}})
  config.lock()
  assert dict(mesh_lib.mesh_from_config(config).shape) == {"fsdp": 4, "tensor": 2}
  mesh = mesh_lib.create_mesh({"data": -1}, devices=jax.devices()[:2])
  assert mesh.devices.shape == (2,)


@pytest.mark.parametrize(
  "shape, message",
  [
    ({"data": 3}, "multiplies to 3 devices but jax.device_count() is 8"),
    ({"data": 2, "fsdp": 2}, "multiplies to 4 devices"),
    ({"data": 3, "fsdp": -1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1}, "at most one axis may be -1"),
    ({"model": 8}, "unknown axes ['model']"),
    ({"data": 0, "fsdp": -1}, "mesh.shape.data = 0"),
    ({}, "mesh.shape is empty"),
  ],
)
def test_bad_shapes_raise(shape, message):
  with pytest.raises(ValueError) as err:
    mesh_lib.create_mesh(shape)
  assert message in str(err.value)


def test_no_distributed_without_a_trigger():
  assert not mesh_lib.maybe_initialize_distributed(environ={})
  assert not mesh_lib.maybe_initialize_distributed(num_processes=1, environ={})
  config = ml_collections.ConfigDict(
    {
      "distributed": {
        "enabled": False,
        "coordinator_address": None,
        "num_processes": None,
        "process_id": None,
      }
    }
  )
  assert not mesh_lib.maybe_initialize_distributed(config, environ={})
  assert not jax.distributed.is_initialized()
  with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
    mesh_lib.maybe_initialize_distributed(environ={"JAX_NUM_PROCESSES": "two"})


_WORKER = textwrap.dedent("""
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flamingo_jax.parallel import mesh as mesh_lib
    assert mesh_lib.maybe_initialize_distributed()  # From JAX_COORDINATOR_ADDRESS & co.
    mesh = mesh_lib.create_mesh({'data': -1})
    sharding = NamedSharding(mesh, P('data'))
    local = np.full((2, 3), jax.process_index() + 1, np.float32)  # 2 rows per process.
    x = jax.make_array_from_process_local_data(sharding, local)
    total = jax.jit(lambda a: a.sum(), out_shardings=NamedSharding(mesh, P()))(x)
    print('RESULT', jax.process_index(), jax.process_count(), jax.device_count(), float(total))
""")


def test_two_cpu_processes_initialize_and_reduce():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  procs = []
  for pid in range(2):
    env = dict(
      os.environ,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
      JAX_NUM_PROCESSES="2",
      JAX_PROCESS_ID=str(pid),
    )
    procs.append(
      subprocess.Popen(
        [sys.executable, "-c", _WORKER], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
      )
    )
  outputs = []
  for p in procs:
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0, out
    outputs.append(out)
  for pid, out in enumerate(outputs):
    line = [l for l in out.splitlines() if l.startswith("RESULT")][0]
    # 2 processes x 2 devices; rows of 1s (process 0) and 2s (process 1): 6*1 + 6*2 = 18.
    assert line.split()[1:] == [str(pid), "2", "4", "18.0"]
