"""Unique (stored) and effective (applied) parameter counts.

A module that applies one set of parameters several times (a block shared
across depth, one RNN cell shared across stacked layers) declares it in its
own scope, outside any scan:

  param_counts.declare_uses(self, num_applications)

and the counts below multiply the parameters under that module's path by
`num_applications` (nested declarations multiply). Sharing over time (an RNN
cell applied at every step) and over space (a conv kernel) is the nature of
those layers and is not counted as extra parameters.

`PARAM_USES` exists only in the variables `model.init` returns; the train
loop drops it before building the train state.
"""

import math

import jax
import jax.numpy as jnp

PARAM_USES = 'param_uses'


def declare_uses(module, times: int) -> None:
  """Declares that the parameters below `module` are applied `times` times.

  The count is stored as the length of an empty-valued marker array so that
  it survives `jax.eval_shape` (the train loop counts parameters from shapes
  alone, without materialising them).
  """
  module.sow(PARAM_USES, 'times', jnp.zeros((times,), jnp.int8))


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, 'key', str(k)) for k in path)


def _multipliers(uses) -> dict[tuple[str, ...], int]:
  """{module path: times its parameters are applied} from the sown tree."""
  out = {}
  for path, times in jax.tree_util.tree_leaves_with_path(uses):
    # Sown values are tuples: the path ends in ('times', index).
    names = _path_names(path)
    module = names[:names.index('times')]
    out[module] = out.get(module, 1) * times.shape[0]
  return out


def count_parameters(variables) -> dict[str, int]:
  """Parameter counts of `model.init(...)` output, total and per top module.

  Args:
    variables: the dict `model.init` returns (or its `jax.eval_shape`), with
      'params' and, for models that share parameters across depth, PARAM_USES.

  Returns:
    {'unique': n, 'effective': n, 'unique/<module>': n,
     'effective/<module>': n, ...} for each top-level module of the params.
  """
  multipliers = _multipliers(variables.get(PARAM_USES, {}))
  counts = {'unique': 0, 'effective': 0}
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables['params']):
    names = _path_names(path)
    times = math.prod(m for prefix, m in multipliers.items()
                      if names[:len(prefix)] == prefix)
    top = names[0]
    size = math.prod(leaf.shape)
    for kind, n in (('unique', size), ('effective', size * times)):
      counts[kind] += n
      counts[f'{kind}/{top}'] = counts.get(f'{kind}/{top}', 0) + n
  return counts
