"""Run by the reference interpreter (launch/reference_env.sh), not by pytest.

  python check_torch_reader.py DIR

`flamingo_jax.convert.state_dict.read_state_dict` where torch exists: DIR/checkpoint.pt (from
make_open_flamingo.py) reads as the same tensors as DIR/checkpoint.safetensors, and a pickle that
would run code (DIR/evil.pt, written here) is refused by `weights_only` with an error naming it.
"""

import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from flamingo_jax.convert import state_dict  # noqa: E402  (the repository, not an installed package)


class RunsCode:
  def __reduce__(self):
    return (os.system, ("echo this must never run",))


def main():
  directory = sys.argv[1]
  pt = state_dict.read_state_dict(os.path.join(directory, "checkpoint.pt"))
  st = state_dict.read_state_dict(os.path.join(directory, "checkpoint.safetensors"))
  assert sorted(pt) == sorted(st), sorted(set(pt) ^ set(st))
  for key in pt:
    np.testing.assert_array_equal(pt[key], st[key], err_msg=key)
  evil = os.path.join(directory, "evil.pt")
  torch.save({"w": torch.zeros(2), "payload": RunsCode()}, evil)
  try:
    state_dict.read_state_dict(evil)
  except ValueError as e:
    assert evil in str(e) and "weights_only" in str(e), e
  else:
    raise AssertionError(f"{evil} was read")


if __name__ == "__main__":
  main()
