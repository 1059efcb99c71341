"""The device mesh, how batches and parameters are laid out on it, and the multi-host plumbing.

One `jax.jit` step runs over a `Mesh` of every device in the job, in every process. The global batch is
split along the `data` axis. Parameters and optimizer state are either replicated (plain data
parallelism, the modern form of `pmap` with the same numerics) or, with `config.fsdp`, sharded along the
same `data` axis (ZeRO-3 / FSDP): each device stores 1/N of every large array (parameters, gradients
after their reduction, optimizer moments), and XLA's SPMD partitioner inserts what the layout implies:
an all-gather of each weight for the step's matmuls, and the reduction of each gradient back to its
shard (a reduce-scatter on GPU/TPU; the CPU compiler all-reduces and slices). No collective is written by
hand; layouts are the only input (`state_shardings`, and `BatchShardedModel` to keep activations split by
batch), so the update is the replicated one up to the order of floating-point sums. The compiler (as seen
in its CPU program) keeps a gathered weight from the forward to the backward pass rather than gathering it
twice, so during the step the float32 parameters exist whole on each device; `scripts/memory_table.py`
measures what that costs.

Multi-host is JAX's own multi-controller runtime: every process runs the same program, calls
`maybe_initialize_distributed()` before touching a device, builds the same mesh from `jax.devices()`,
reads its own part of the data and hands it to `global_batch`.
"""

from __future__ import annotations

import glob
import importlib.util
import math
import os
import signal
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vit_cls import errors

DATA_AXIS = "data"

# Arrays with fewer elements than this stay replicated under fsdp: gathering a bias or a LayerNorm scale
# costs a collective's latency and saves a few KiB. 2**14 float32 = 64 KiB: every kernel of a real ViT is
# far larger; biases, LayerNorm and `cls` stay whole.
FSDP_MIN_SIZE = 2**14


# ----------------------------------------------------------------------------------------------------
# Starting the multi-controller runtime.


def distributed_args(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None, environ=None) -> dict | None:
  """The `jax.distributed.initialize` keyword arguments for this process, or None for a 1-process run.

  Kept apart from the call so that the decision is testable without starting anything. In order:

  1. Explicit values (train.py's --coordinator_address/--num_processes/--process_id flags), else the
     JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables: what a GPU
     cluster launcher (scripts/launch_gpu.py) passes. One process (num_processes=1) is no job.
  2. A Cloud TPU VM: `{}`, i.e. `jax.distributed.initialize()` with no arguments, which reads the
     slice's workers from the TPU metadata itself (the call Google documents for TPU slices; on a
     single-host VM it makes a one-process job, which is harmless).
  3. Slurm (`srun`, one task per GPU) or Open MPI (`mpirun`) with several tasks: `{}` too; JAX reads
     their variables (and gives each process the GPU of its local rank).
  """
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
  count = num_processes if num_processes is not None else env.get("JAX_NUM_PROCESSES")
  index = process_id if process_id is not None else env.get("JAX_PROCESS_ID")
  if address or count is not None or index is not None:
    missing = [name for name, v in (("coordinator address", address), ("process count", count),
                                    ("process id", index)) if v in (None, "")]
    if missing:
      raise errors.ConfigError(
          f"multi-process run is missing the {', '.join(missing)}: pass all three of "
          f"--coordinator_address, --num_processes, --process_id (or JAX_COORDINATOR_ADDRESS, "
          f"JAX_NUM_PROCESSES, JAX_PROCESS_ID), or none of them for a single-process run.")
    count, index = int(count), int(index)
    if not 0 <= index < count:
      raise errors.ConfigError(f"process id {index} is outside [0, {count}): ids run 0..num_processes-1.")
    if count == 1:
      return None
    return dict(coordinator_address=address, num_processes=count, process_id=index)
  if _on_cloud_tpu_vm(env):
    return {}
  # A job step that srun started with several tasks (not the batch script of an sbatch job, which has
  # SLURM_NTASKS but is one process: initialising there would wait for peers that never come).
  if int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1:
    return {}
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return {}
  return None


def _on_cloud_tpu_vm(env) -> bool:
  """TPU chips on this host and libtpu installed: the same test JAX itself makes before using a TPU."""
  if env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES"):
    return True
  chips = glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*")
  return bool(chips) and importlib.util.find_spec("libtpu") is not None


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None) -> bool:
  """Starts JAX's multi-controller runtime when this process is one of several, and only then.

  Must run before anything initialises a JAX backend (jax.devices(), any computation). Idempotent.
  Returns whether the runtime is up. A plain single-process run (CPU, one GPU host) skips all of it.
  """
  if jax.distributed.is_initialized():
    return True
  args = distributed_args(coordinator_address, num_processes, process_id)
  if args is None:
    return False
  # Cross-process collectives between CPU devices need an implementation (gloo is JAX's default in
  # recent versions; older ones had none). It only concerns CPU devices, so it is harmless elsewhere.
  try:
    if jax.config.jax_cpu_collectives_implementation in (None, "none"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except AttributeError:  # A JAX without the option.
    pass
  latch = signal.getsignal(signal.SIGTERM)
  jax.distributed.initialize(**args)
  # From here JAX's preemption sync manager owns SIGTERM (its handler replaced any Python one). A SIGTERM
  # that train.py's start-up latch caught before this point is handed to it, so that every process
  # still checkpoints one agreed step instead of this one alone remembering a flag.
  if getattr(latch, "received", False):
    signal.raise_signal(signal.SIGTERM)
  return True


# ----------------------------------------------------------------------------------------------------
# Mesh and layouts.


def create_mesh() -> Mesh:
  """A 1-D mesh over every device of every process, in JAX's global device order.

  That order lists each process's devices together, so each process's share of the batch is one
  contiguous block of the global batch (process 0 first), which is what `global_batch` assumes.
  """
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def on_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` as JAX's ambient mesh: wrap the function handed to `jax.jit`.

  Inside, `jax.sharding.get_abstract_mesh()` is `mesh`'s abstract mesh. That is how the model learns the
  mesh without importing or receiving one: `speed.attention` reads it to run Pallas splash attention in
  a shard_map over the batch on TPU (a Mosaic kernel cannot be partitioned by XLA). The context is
  entered inside the traced function (`jax.sharding.use_abstract_mesh`, allowed under jit; `jax.set_mesh`
  is not), so it holds whenever and wherever jit traces, lazily at the first call or at `.lower`, with no
  context needed at the call sites. Same function; nothing else in the step reads the ambient mesh.
  """
  abstract = mesh.abstract_mesh

  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(abstract):
      return fn(*args, **kwargs)
  return traced


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the data axis, the rest whole."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int | None = None) -> P:
  """The PartitionSpec of one array under fsdp: its largest dimension that `num_shards` divides, split
  along `data`; everything else whole. Small arrays, and arrays with no such dimension, stay replicated.

  The rule looks at the shape only, so an optimizer moment (Adam's mu and nu, SGD's momentum) gets the
  layout of its parameter without matching tree paths through optax's state: updates then need no
  resharding. `min_size` defaults to FSDP_MIN_SIZE, read at call time (tests lower it for tiny models).
  """
  min_size = FSDP_MIN_SIZE if min_size is None else min_size
  if num_shards <= 1 or math.prod(shape) < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: (-shape[d], d)):
    if shape[dim] % num_shards == 0:
      spec = [None] * len(shape)
      spec[dim] = DATA_AXIS
      return P(*spec)
  return P()


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool = False, min_size: int | None = None) -> Any:
  """A NamedSharding for every leaf of `tree` (arrays or ShapeDtypeStructs): replicated, or the fsdp
  layout of `fsdp_spec`. Applied to the whole train state: parameters, optimizer state, step."""
  n = mesh.shape[DATA_AXIS]
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), tree)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), n, min_size)), tree)


class BatchShardedModel:
  """`model` whose `apply` keeps every activation split along the batch: what makes fsdp ZeRO-3.

  Parameters sharded along `data` and a batch sharded along `data` meet in every matmul, and the two
  layouts cannot both stay: XLA's SPMD partitioner may keep the weight sharded and all-gather the
  *activations* of the whole global batch instead (seen on this model: [global batch, tokens, width]
  all-gathers and all-reduces), which costs more memory per example than replication and does not scale
  with the batch. Constraining each sub-module's batch-leading outputs to the batch layout leaves one
  choice, the ZeRO-3 one: all-gather a weight where it is used, and reduce-scatter its gradient.

  The constraint is applied from outside the model, through flax's method interception, so the model
  stays free of mesh code: every `__call__` that takes a batch-leading array and returns some gets them
  constrained. Same function, same numbers; only the placement changes. Other attributes pass through.
  """

  def __init__(self, model, mesh: Mesh):
    self._model = model
    self._sharding = batch_sharding(mesh)

  def __getattr__(self, name):
    return getattr(self._model, name)

  def apply(self, variables, images, *args, **kwargs):
    import flax.linen as nn  # pylint: disable=g-import-not-at-top
    batch = images.shape[0]

    def is_activation(x):
      return isinstance(x, jax.Array) and x.ndim >= 2 and x.shape[0] == batch

    def constrain(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if context.method_name != "__call__" or not any(
          is_activation(a) for a in jax.tree.leaves((args, kwargs))):
        return out
      return jax.tree.map(
          lambda x: jax.lax.with_sharding_constraint(x, self._sharding) if is_activation(x) else x, out)

    with nn.intercept_methods(constrain):
      return self._model.apply(variables, images, *args, **kwargs)


# XLA's GPU compiler merges independent collectives of one kind into one (its combiner passes, up to a
# size threshold). Under fsdp that puts the gradients of every layer into one or two reduce-scatters
# (weights) and all-reduces (biases and LayerNorm parameters, which stay replicated): ops that can start
# only after the last layer's backward. Its scheduler then places what feeds them, each layer's
# weight-gradient matmuls and bias / LayerNorm reductions, right before them, so every layer's
# rematerialised activations and their cotangents ([batch, tokens, mlp_dim] and [batch, tokens, width]
# per layer) stay alive through the whole backward pass: remat undone, and per-device temporaries above
# replicated data parallelism's on one GPU (docs/memory.md). Compiled with these options, each gradient
# gets its own collective, issued as soon as its layer's backward has produced it. The same reductions
# of the same values; only how the collectives are grouped changes.
GPU_FSDP_STEP_OPTIONS = {
    "xla_gpu_reduce_scatter_combine_threshold_bytes": 1,
    "xla_gpu_all_reduce_combine_threshold_bytes": 1,
}


def step_compiler_options(mesh: Mesh, fsdp: bool) -> dict | None:
  """XLA options for the train step on `mesh`: `GPU_FSDP_STEP_OPTIONS` for fsdp over several GPUs,
  else None (the compiler's defaults)."""
  devices = list(mesh.devices.flat)
  if not fsdp or len(devices) <= 1 or devices[0].platform not in ("gpu", "cuda", "rocm"):
    return None
  return dict(GPU_FSDP_STEP_OPTIONS)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of `tree` (arrays or sharded ShapeDtypeStructs): what fsdp divides."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += math.prod(shape) * np.dtype(x.dtype).itemsize
  return total


# ----------------------------------------------------------------------------------------------------
# Moving data between hosts and the global arrays.


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles the global array from this process's share of the batch (each process reads its own)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Full numpy values of (possibly sharded, possibly multi-process) arrays, on every process.

  Replicated arrays and arrays whose shards are all local are read directly; an fsdp-sharded array of a
  multi-process job is gathered across processes (a collective: every process must call this).
  """
  leaves = jax.tree.leaves(tree)
  if all(getattr(x, "is_fully_addressable", True) or getattr(x, "is_fully_replicated", False)
         for x in leaves):
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
