"""Config files by path.

`load_config('configs/NAME.py:VARIANT')` loads a file the way `--config`
does, for code that reads configs without flags (benchmarks, the ablation
driver). Config files are Python and run arbitrary code when loaded.
"""

import importlib.util
import os

import ml_collections

from bigjax.errors import UserError


def load_config(path: str) -> ml_collections.ConfigDict:
  """Calls `get_config(VARIANT or None)` of FILE for a path 'FILE[:VARIANT]'.

  Raises:
    UserError: FILE does not exist (relative paths are read from the current
      directory, as --config reads them).
  """
  file, _, arg = path.partition(':')
  if not os.path.isfile(file):
    raise UserError(f"config file '{file}' does not exist (relative to "
                    f"{os.getcwd()}); the configs are in configs/")
  spec = importlib.util.spec_from_file_location('loaded_config', file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)



def key_paths(config, prefix: str = '') -> set[str]:
  """Every key path of a ConfigDict, inner nodes included:
  {'seed', 'optimizer', 'optimizer.name', ...}."""
  keys = set()
  for k, v in config.items():
    path = f'{prefix}{k}'
    keys.add(path)
    if hasattr(v, 'items'):
      keys |= key_paths(v, f'{path}.')
  return keys
