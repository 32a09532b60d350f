"""Device meshes and shardings, from logical axis names and config rules.

The layout of a run is two config entries and nothing else:

  config.mesh             sizes of the mesh axes 'data', 'fsdp', 'tensor'
                          (-1: the devices the others leave);
  config.sharding_preset  'data_parallel', 'fsdp' or 'fsdp_tensor' (PRESETS);
  config.sharding_rules   extra (logical name, mesh axes) rules tried before
                          the preset's, so they override it.

Parameters carry logical axis names (`bigjax.models.axes`). A dimension named
`n` goes to the mesh axes of the first rule for `n` whose axes are still free
in that array and whose size divides the dimension; otherwise it stays
replicated. The divisibility fallback is what lets one preset serve every
model: a 10-way classifier head or a 1-channel first convolution simply stays
whole. The step functions never see the mesh: only the shardings handed to
`jax.jit` change when the layout does.

The batch dimension is named 'batch' and must divide exactly (it is checked,
never silently replicated).
"""

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigjax.errors import UserError
from bigjax.models import axes

# Mesh axes, outermost first: consecutive devices (one host, the fastest
# links) go to the innermost axis, so tensor parallelism, which communicates
# in every layer, stays within a host; data parallelism, which communicates
# once a step, spans hosts.
MESH_AXES = ('data', 'fsdp', 'tensor')

MeshAxes = Union[None, str, tuple[str, ...]]
Rule = tuple[str, MeshAxes]

# Examples are split over every axis that holds a different part of the
# batch; 'tensor' devices of one group see the same examples.
_BATCH = (('batch', ('data', 'fsdp')),)
# Fully sharded data parallel: every weight is split over 'fsdp' along its
# first dimension that divides (ZeRO-3 style); XLA gathers it for the matmul.
_FSDP = tuple((name, 'fsdp') for name in (
    'embed', 'mlp', 'vocab', 'conv_in', 'conv_out', 'rnn_in', 'rnn_gates',
    'rnn_hidden'))
# Tensor parallelism (Megatron): attention heads, the feed-forward hidden
# width (column-split in, row-split out), the vocabulary, conv output
# channels and recurrent gates are split over 'tensor'. Listed before the
# FSDP rules so a dimension takes 'tensor' first and falls back to 'fsdp'.
_TENSOR = tuple((name, 'tensor') for name in (
    'heads', 'mlp', 'vocab', 'conv_out', 'rnn_gates', 'rnn_hidden'))

PRESETS: dict[str, tuple[Rule, ...]] = {
    'data_parallel': _BATCH,
    'fsdp': _BATCH + _FSDP,
    'fsdp_tensor': _BATCH + _TENSOR + _FSDP,
}


# ---- Meshes -------------------------------------------------------------------


def mesh_shape(mesh_config: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """{axis: size} in MESH_AXES order, with the one -1 resolved.

  Raises UserError for unknown axes, bad sizes, or sizes that do not fit
  `num_devices`.
  """
  unknown = set(mesh_config) - set(MESH_AXES)
  if unknown:
    raise UserError(f'config.mesh has unknown axes {sorted(unknown)}; the axes '
                    f'are {", ".join(MESH_AXES)}')
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  described = ', '.join(f'{a}={s}' for a, s in sizes.items())
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise UserError(f'config.mesh.{a}={s}: sizes must be positive, or -1 for '
                      'the devices the other axes leave')
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise UserError(f'config.mesh ({described}) has more than one -1; give '
                    'all but one axis a size')
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(
          f'config.mesh ({described}) needs a multiple of {fixed} devices but '
          f'there are {num_devices}; change the fixed sizes')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(
        f'config.mesh ({described}) spans {fixed} devices but there are '
        f'{num_devices}; set one axis to -1 or make the sizes multiply to '
        f'{num_devices}')
  return sizes


def make_mesh(mesh_config: Mapping[str, int],
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """The named mesh `config.mesh` describes, over `devices` (default: all).

  Axis types are Auto (GSPMD propagation) on purpose: inputs, outputs and
  parameters are pinned by the shardings we pass to `jax.jit`; the
  partitioner places the intermediate values.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  return jax.make_mesh(tuple(sizes.values()), tuple(sizes),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(sizes),
                       devices=devices)


def rules_from_config(config) -> tuple[Rule, ...]:
  """The config's own rules, then its preset's (first match wins).

  The preset name is checked by `config_validation.validate`, which calls
  this for the rules' own checks.
  """
  return tuple(_check_rule(r) for r in config.sharding_rules) + PRESETS[
      config.sharding_preset]


def _check_rule(rule) -> Rule:
  """A (logical name, mesh axes) pair, or a UserError naming what is wrong."""
  if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
    raise UserError(f'config.sharding_rules entry {rule!r} is not a pair '
                    "(logical name, mesh axes), e.g. ('mlp', 'tensor')")
  name, mesh_axes = rule
  if name not in axes.LOGICAL_AXES:
    raise UserError(f'config.sharding_rules names logical axis {name!r}, which '
                    f'no model uses; the names are {", ".join(axes.LOGICAL_AXES)}')
  axes_tuple = _as_tuple(mesh_axes)
  bad = [a for a in axes_tuple if a not in MESH_AXES]
  if bad:
    raise UserError(f'config.sharding_rules maps {name!r} to {bad}, not mesh '
                    f'axes; use {", ".join(MESH_AXES)} or None')
  return name, (None if not axes_tuple else
                axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
  if mesh_axes is None:
    return ()
  return (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)


# ---- Logical names -> PartitionSpecs ----------------------------------------


def logical_to_spec(names: Sequence[Optional[str]], shape: Sequence[int],
                    rules: Iterable[Rule], sizes: Mapping[str, int]) -> P:
  """The PartitionSpec of an array with logical axis `names` and `shape`.

  Each dimension takes the mesh axes of the first rule for its name whose
  axes are not taken by an earlier dimension and whose total size divides the
  dimension; a rule mapping the name to None stops the search (replicated).

  Args:
    names: one logical name (or None) per dimension.
    shape: the array's global shape.
    rules: (logical name, mesh axes) pairs in priority order.
    sizes: {mesh axis: size}.
  """
  if len(names) != len(shape):
    raise ValueError(f'{len(names)} logical names {names} for shape {shape}')
  rules = tuple(rules)
  taken, spec = set(), []
  for name, dim in zip(names, shape):
    choice = None
    for rule_name, mesh_axes in rules:
      if rule_name != name or name is None:
        continue
      wanted = _as_tuple(mesh_axes)
      if not wanted:
        break  # An explicit None: keep this dimension whole.
      if taken.isdisjoint(wanted) and dim % math.prod(
          sizes[a] for a in wanted) == 0:
        choice = mesh_axes
        taken.update(wanted)
        break
    spec.append(choice)
  return P(*spec)


def is_box(x) -> bool:
  """Whether `x` is a parameter boxed with logical axis names."""
  return isinstance(x, nn.Partitioned)


def logical_specs(boxed_tree, rules: Iterable[Rule],
                  sizes: Mapping[str, int]):
  """PartitionSpecs for a tree of (abstract) arrays, some logically boxed.

  Returns a tree shaped like `nn.unbox(boxed_tree)`: boxed arrays get the
  spec their names resolve to, unboxed ones (e.g. BatchNorm statistics, the
  step counter) are replicated.
  """
  rules = tuple(rules)

  def spec(leaf):
    if is_box(leaf):
      return logical_to_spec(leaf.names, leaf.value.shape, rules, sizes)
    return P()
  return jax.tree.map(spec, boxed_tree, is_leaf=is_box)


def specs_like_params(tree, params, param_specs):
  """Specs for optimizer state: each leaf that mirrors a parameter gets its spec.

  Optax states hold copies of the parameter tree (Adam's mu and nu, momentum
  traces), possibly nested in chains, masks or multi_transform. A state leaf
  whose key path ends with a parameter's path and whose shape equals it takes
  that parameter's spec; anything else (step counters, scalars) is
  replicated. Matching paths, rather than running the optimizer's init on
  boxed parameters, works for every optimizer, masked ones included.
  """
  table = {}
  for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(params),
                                jax.tree.leaves(param_specs)):
    table[jax.tree_util.keystr(path)] = (tuple(leaf.shape), spec)

  def spec(path, leaf):
    for start in range(len(path)):  # Longest suffix first.
      hit = table.get(jax.tree_util.keystr(path[start:]))
      if hit is not None and hit[0] == tuple(leaf.shape):
        return hit[1]
    return P()
  return jax.tree_util.tree_map_with_path(spec, tree)


def named(mesh: Mesh, specs):
  """NamedShardings on `mesh` for a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ---- The batch ---------------------------------------------------------------


def batch_axes(rules: Iterable[Rule]) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (first 'batch' rule)."""
  for name, mesh_axes in rules:
    if name == 'batch':
      return _as_tuple(mesh_axes)
  return ()


def batch_sharding(mesh: Mesh, rules: Iterable[Rule], global_batch_size: int,
                   *, key: str = 'batch_size') -> NamedSharding:
  """Leading (batch) dimension split over the batch axes, the rest replicated.

  Raises UserError when `global_batch_size` (config key `key`) does not
  divide by the number of batch shards: a batch is never silently
  replicated. Also checks that each process's devices hold one contiguous
  slice of every global batch, the slice the input pipeline reads.
  """
  names = batch_axes(rules)
  shards = math.prod(mesh.shape[a] for a in names)
  if global_batch_size % shards:
    raise UserError(
        f'config.{key}={global_batch_size} does not divide by the {shards} '
        f'batch shards (mesh axes {"x".join(names) or "none"}); use a '
        f'multiple of {shards}')
  sharding = NamedSharding(mesh, P(names or None))
  _check_process_rows(sharding, global_batch_size)
  return sharding


def process_rows(sharding: NamedSharding, global_batch_size: int) -> slice:
  """The rows of a global batch this process's devices hold, as one slice."""
  index_map = sharding.addressable_devices_indices_map((global_batch_size,))
  starts = [s[0].indices(global_batch_size)[0] for s in index_map.values()]
  stops = [s[0].indices(global_batch_size)[1] for s in index_map.values()]
  return slice(min(starts), max(stops))


def _check_process_rows(sharding: NamedSharding, global_batch_size: int) -> None:
  count, index = jax.process_count(), jax.process_index()
  size = global_batch_size // count
  if process_rows(sharding, global_batch_size) != slice(
      index * size, (index + 1) * size):
    raise UserError(
        'config.mesh puts parts of one process\'s batch slice on other '
        'processes (a model-parallel axis spans hosts); make '
        'config.mesh.tensor at most the devices per host')


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each host's share [local_batch, ...] into global jax.Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)


# ---- Reports -----------------------------------------------------------------


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree laid out by `shardings` (even splits)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree),
                            jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
  return total


def tree_bytes(abstract_tree) -> int:
  """Bytes of a tree of (abstract) arrays, unsharded."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def spec_text(spec: P, ndim: int) -> str:
  """A PartitionSpec as 'fsdp,tensor,-' (one entry per dim, '-' replicated,
  'data+fsdp' for a dim split over two axes)."""
  entries = list(spec) + [None] * (ndim - len(spec))
  return ','.join('-' if e is None else '+'.join(_as_tuple(e))
                  for e in entries) or 'scalar'


def _megabytes(n: int) -> str:
  return f'{n / 2**20:,.2f} MiB'


def describe_mesh(mesh: Mesh) -> str:
  axes_text = ' x '.join(f'{a}={s}' for a, s in mesh.shape.items())
  return (f'Mesh {axes_text}: {mesh.size} devices ({mesh.devices.flat[0].platform})'
          f' in {jax.process_count()} process(es)')


def report(mesh: Mesh, boxed_params, param_specs, parts: Mapping[str, Any]) -> str:
  """The mesh, a per-parameter table and per-device totals, as text.

  Args:
    mesh: the run's mesh.
    boxed_params: abstract parameters with their logical-name boxes.
    param_specs: their PartitionSpecs (shaped like the unboxed params).
    parts: {name: (abstract tree, shardings)} for the totals, e.g.
      'params', 'opt_state', 'model_state'.
  """
  rows = [('parameter', 'shape', 'logical axes', 'spec', 'bytes/device')]
  leaves = jax.tree_util.tree_leaves_with_path(boxed_params, is_leaf=is_box)
  for (path, leaf), spec in zip(leaves, jax.tree.leaves(
      param_specs, is_leaf=lambda x: isinstance(x, P))):
    value = leaf.value if is_box(leaf) else leaf
    names = leaf.names if is_box(leaf) else (None,) * len(value.shape)
    sharding = NamedSharding(mesh, spec)
    shard_bytes = math.prod(sharding.shard_shape(tuple(value.shape))) * (
        np.dtype(value.dtype).itemsize)
    rows.append((
        axes.path_text(path), 'x'.join(map(str, value.shape)) or 'scalar',
        ','.join(n or '-' for n in names) or 'scalar',
        spec_text(spec, len(value.shape)), f'{shard_bytes:,}'))
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  lines = [describe_mesh(mesh)]
  lines += ['  '.join(c.ljust(w) if i < 4 else c.rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
  sharded_total = whole_total = 0
  for name, (tree, shardings) in parts.items():
    if not jax.tree.leaves(tree):
      continue
    sharded, whole = bytes_per_device(tree, shardings), tree_bytes(tree)
    sharded_total, whole_total = sharded_total + sharded, whole_total + whole
    lines.append(f'{name}: {_megabytes(sharded)} per device of '
                 f'{_megabytes(whole)}')
  lines.append(f'total: {_megabytes(sharded_total)} per device of '
               f'{_megabytes(whole_total)} '
               f'({sharded_total / max(whole_total, 1):.3f} of a replicated copy)')
  return '\n'.join(lines)
