"""Run in the reference interpreter: modules of open_clip and open_flamingo without their packages'
__init__, which import torchvision's image transforms (and open_flamingo's, open_clip and
transformers' model zoo). PyPI's torchvision build needs CUDA torch, so the reference interpreter has
none; the modules the tests build need only torch, einops and numpy (open_clip's `utils` imports one
torchvision name, for frozen batch norm, which a ViT never uses)."""

import importlib
import importlib.util
import sys
import types


def load(module: str) -> types.ModuleType:
  """`load('open_clip.transformer')`: the module, its parent packages made empty namespaces."""
  parts = module.split(".")
  for depth in range(1, len(parts)):
    name = ".".join(parts[:depth])
    if name not in sys.modules:
      package = types.ModuleType(name)
      if depth == 1:
        package.__path__ = importlib.util.find_spec(name).submodule_search_locations
      else:
        package.__path__ = [f"{sys.modules['.'.join(parts[: depth - 1])].__path__[0]}/{parts[depth - 1]}"]
      sys.modules[name] = package
  for name in ("torchvision", "torchvision.ops", "torchvision.ops.misc"):
    sys.modules.setdefault(name, types.ModuleType(name))
  sys.modules["torchvision.ops.misc"].FrozenBatchNorm2d = None
  return importlib.import_module(module)
