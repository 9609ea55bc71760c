"""Preemption: SIGTERM (a TPU VM preemption notice) -> a flag polled by the loop at step boundaries.

`install_preemption_handler()` turns SIGTERM into a flag the loop polls (`preemption_requested()`) at
step boundaries; the loop saves there, never in the handler. Multi-host: hosts may get the signal at
different steps, so every host calls `should_stop_all_hosts(preemption_requested())` at the same step
(a collective) and acts on its result: all hosts save the same step and stop together.
"""

import signal
import threading
from collections.abc import Callable, Sequence

import numpy as np


class _Flag:
  """A bool set from a signal handler (a plain attribute: no locks inside a handler)."""

  def __init__(self):
    self.value = False


# Signal dispositions are per process, so the flag they set is necessarily process-wide.
_PREEMPTION = _Flag()


def install_preemption_handler(
  callback: Callable[[int], None] | None = None, signals: Sequence[int] = (signal.SIGTERM,)
) -> Callable[[], None]:
  """On SIGTERM, sets the flag `preemption_requested()` returns; returns `uninstall()`.

  The handler only sets the flag (then calls `callback(signum)` if given: keep it tiny, e.g. a log
  line; never save from it). Clears the flag. Must be called from the main thread.
  """
  if threading.current_thread() is not threading.main_thread():
    raise RuntimeError("install_preemption_handler must be called from the main thread")
  _PREEMPTION.value = False

  def handler(signum, frame):  # pylint: disable=unused-argument
    _PREEMPTION.value = True
    if callback is not None:
      callback(signum)

  previous = {s: signal.signal(s, handler) for s in signals}

  def uninstall():
    for s, h in previous.items():
      signal.signal(s, signal.SIG_DFL if h is None else h)

  return uninstall


def preemption_requested() -> bool:
  """Whether this process received SIGTERM since `install_preemption_handler`."""
  return _PREEMPTION.value


def should_stop_all_hosts(local_flag: bool) -> bool:
  """True on every host when any host's `local_flag` is True (a collective: all hosts must call it
  at the same step, e.g. every step or every N steps)."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  flags = multihost_utils.process_allgather(np.asarray(bool(local_flag), np.int32))
  return bool(np.any(flags))
