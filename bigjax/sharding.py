"""The device mesh and the shardings the train loop places arrays with.

Today every run is data parallel over all devices of all hosts: the batch is
split over the mesh axis 'data' and the train state is replicated. The step
functions never look at the mesh; only the shardings passed to `jax.jit`
change when the layout does.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh() -> Mesh:
  """A 1-D mesh named 'data' over every device of every process.

  Axis types are Auto (GSPMD propagation) on purpose: the partitioner places
  intermediate values, and only inputs and outputs are pinned.
  """
  return jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """Assembles each host's share [local_batch, ...] into global jax.Arrays."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
      local_batch)
