"""A checkpoint file's tensors, for the converters of the public checkpoints: safetensors through the
numpy API, or a torch `.pt` / `.bin` file read only with `torch.load(weights_only=True)`, which refuses
pickled code (torch is needed for those alone)."""

import os

import numpy as np


def read_state_dict(path: str) -> dict[str, np.ndarray]:
  """{name: float32 array} of a safetensors or torch file; errors name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  if path.endswith(".safetensors"):
    from safetensors import numpy as st_numpy  # pylint: disable=g-import-not-at-top

    try:
      return dict(st_numpy.load_file(path))
    except Exception as e:  # pylint: disable=broad-except  (a truncated or foreign file)
      raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
  try:
    import torch  # pylint: disable=g-import-not-at-top  (only for .pt/.bin sources)
  except ImportError:
    raise ImportError(
      f"{path}: reading a torch file needs torch (pip install torch); safetensors does not"
    ) from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (weights_only refuses pickled code)
    raise ValueError(f"{path}: torch.load(weights_only=True) refused it ({type(e).__name__}: {e})") from None
  state = state.get("state_dict", state)
  return {k.removeprefix("module."): v.float().numpy() for k, v in state.items()}
