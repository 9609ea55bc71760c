"""Test set-up: 8 simulated host CPU devices, set before JAX is imported anywhere."""

import os
import shutil
import tempfile

# Tests compile many small programs: cheaper XLA CPU back-end passes halve compile time, and tiny
# shapes run fast without them. Subprocesses started by tests inherit the same flags.
os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# RBG keys compile ~5x faster than threefry for parameter initialisation on CPU (random streams differ,
# but tests never depend on particular random values).
os.environ.setdefault("JAX_DEFAULT_PRNG_IMPL", "rbg")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache per test session, shared with the subprocesses (training runs that
# restart, stage 2 after stage 1): the same programs compile once. Fresh each session: no stale entries.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="flamingo-jax-tests-xla-cache-"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
# TensorFlow (tf.data) must never grab accelerators or the JAX devices.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402  (after the environment is set)

jax.config.update("jax_default_matmul_precision", "highest")


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _OWN_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: long checks, opt-in with -m slow")


def pytest_collection_modifyitems(config, items):
  """The training tests (subprocess runs, minutes per file) first: with two workers (pytest.ini) the
  suite then ends on short files instead of one worker finishing a long one alone."""
  del config
  items.sort(key=lambda item: not item.nodeid.startswith("tests/train/"))
