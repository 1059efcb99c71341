"""The device mesh, how batches and parameters are laid out on it, and the multi-host plumbing.

One `jax.jit` step runs over a `Mesh` of every device in the job. The global batch is split along the
`data` axis; parameters and optimizer state are replicated. This is the modern form of `pmap` with the
same numerics: the batch size in a config is the global batch.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when this process is one of several, and only then.

  Cloud TPU pods describe themselves to `jax.distributed.initialize()`; GPU clusters pass
  JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. A plain single-process run needs none of
  this and skips it.
  """
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
        process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()  # a multi-host TPU slice configures itself


def create_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, in JAX's global device order."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global array from this process's share of the batch (each process reads its own)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
