"""Device mesh, logical-axis sharding rules, multi-host setup and global batches.

Mesh axes are (`data`, `fsdp`, `tensor`) with `AxisType.Auto` (GSPMD propagation); batches shard their
leading axis over (`data`, `fsdp`). Parameter shardings come from the logical axis names every
parameter carries, mapped to mesh axes by the config's rules.
"""
from __future__ import annotations

import contextlib
import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolve the config's mesh sizes (one may be -1) against the device count, or raise one clear line."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  unknown = [a for a, s in zip(MESH_AXES, shape) if s == -1]
  if len(unknown) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, shape))}")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, shape))}")
  known = math.prod(s for s in shape if s != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide the {num_devices} "
                       "devices of this run")
    shape[MESH_AXES.index(unknown[0])] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices but this "
                     f"run has {num_devices}")
  return tuple(shape)


def make_mesh(sizes: dict[str, int], devices: Sequence[Any] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(sizes, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def axis_rules(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules (list of pairs, mesh axes as str / tuple / None) -> Flax logical axis rules."""
  out = []
  for logical, mesh_axes in rules:
    if isinstance(mesh_axes, list):
      mesh_axes = tuple(mesh_axes)
    out.append((logical, mesh_axes))
  return tuple(out)


def logical_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of `nn.LogicallyPartitioned` leaves (abstract or concrete)."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, axis_rules(rules))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Make `mesh` the current mesh and `rules` the logical axis rules (for constraints in models)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    yield


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def initialize_distributed() -> None:
  """`jax.distributed.initialize()` when the launcher says this run spans several processes.

  On a TPU pod slice / SLURM / an explicit coordinator, JAX detects the cluster itself; on one process
  this is a no-op, so the same command works on a laptop and on every host of a slice.
  """
  multi = any(os.environ.get(k) for k in (
      "JAX_COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS",
      "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
  if os.environ.get("SLURM_NTASKS") == "1" or os.environ.get("TPU_WORKER_HOSTNAMES", "x") in (
      "localhost", ""):
    multi = False
  if multi and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's slice of the batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
