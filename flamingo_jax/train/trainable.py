"""Freezing as data: regexes over parameter paths split a Haiku params tree into trainable and frozen.

Paths are 'module/path/param' (e.g. `lm/gated_xattn/q`). Every parameter must be claimed by exactly one
of the two lists of a config's `freeze` section; anything unclaimed or claimed twice raises, naming it.
"""

import re
from collections.abc import Sequence

import haiku as hk


def _claims(path: str, patterns: Sequence[str]) -> bool:
  return any(re.search(p, path) for p in patterns)


def check_claims(params, trainable: Sequence[str], frozen: Sequence[str]) -> None:
  """Raises if a parameter is claimed by neither or both lists."""
  for module, leaves in params.items():
    for name in leaves:
      path = f"{module}/{name}"
      t, f = _claims(path, trainable), _claims(path, frozen)
      if t == f:
        which = "both the trainable and the frozen rules" if t else "no freeze rule"
        raise ValueError(f"Parameter {path} is claimed by {which}; fix config.freeze.")


def split(params, trainable: Sequence[str], frozen: Sequence[str]):
  """(trainable_params, frozen_params), both Haiku-style dicts. Checks every claim first."""
  check_claims(params, trainable, frozen)
  return hk.data_structures.partition(lambda module, name, _: _claims(f"{module}/{name}", trainable), params)


def merge(trainable_params, frozen_params):
  """The full params tree back from its two parts."""
  return hk.data_structures.merge(trainable_params, frozen_params)
