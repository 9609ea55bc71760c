"""The SIGTERM preemption flag and its multi-host agreement (one process here)."""

import os
import signal
import time

from flamingo_jax.train import preemption


def test_sigterm_sets_preemption_flag():
  calls = []
  before = signal.getsignal(signal.SIGTERM)
  uninstall = preemption.install_preemption_handler(calls.append)
  try:
    assert not preemption.preemption_requested()
    assert not preemption.should_stop_all_hosts(preemption.preemption_requested())
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100):  # the handler runs on the main thread at the next bytecode boundary
      if preemption.preemption_requested():
        break
      time.sleep(0.01)
    assert preemption.preemption_requested()
    assert calls == [signal.SIGTERM]
    assert preemption.should_stop_all_hosts(preemption.preemption_requested())
  finally:
    uninstall()
  assert signal.getsignal(signal.SIGTERM) == before
  preemption.install_preemption_handler()()  # installing clears the flag
  assert not preemption.preemption_requested()
