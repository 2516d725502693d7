"""Device mesh, logical-axis sharding rules and global batches (the processes start together in
`multihost`).

Mesh axes are (`data`, `fsdp`, `tensor`) with `AxisType.Auto` (GSPMD propagation); batches shard their
leading axis over (`data`, `fsdp`). Parameter shardings come from the logical axis names every
parameter carries, mapped to mesh axes by the config's rules.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


# `jax.set_mesh` (a context manager) arrived in jax 0.7.1; jax 0.6, the newest on Python 3.10, has
# `jax.sharding.use_mesh` for the same (its `set_mesh` is a global setter there).
_use_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh

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


def make_hybrid_mesh(sizes: dict[str, int], num_slices: int,
                     devices: Sequence[Any] | None = None) -> Mesh:
  """A multi-slice mesh: `data` spans the slices (data-centre network), `sizes` lay out each slice.

  `sizes` are one slice's axis sizes (one may be -1); the mesh's data axis is num_slices x
  sizes["data"], slice-major, so the FSDP and tensor collectives stay on a slice's chip
  interconnect and only the data-parallel gradient reduction crosses slices. Devices must carry
  `slice_index` (TPU multi-slice)."""
  devices = list(jax.devices() if devices is None else devices)
  slices = sorted({getattr(d, "slice_index", None) for d in devices}, key=str)
  if len(slices) != num_slices or len(devices) % num_slices:
    raise ValueError(f"hybrid mesh: {num_slices} slices asked, the {len(devices)} devices are in "
                     f"slices {slices}")
  ici = mesh_shape(sizes, len(devices) // num_slices)
  dcn = (num_slices,) + (1,) * (len(MESH_AXES) - 1)
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


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


def use_mesh(mesh: Mesh):
  """Make `mesh` the current mesh, without axis rules: for work on a mesh of its own inside a
  `mesh_context` of another (process 0 decodes on its local devices in a run on every host's)."""
  return _use_mesh(mesh)


@contextlib.contextmanager
def on_host_cpu():
  """Eager jax math on this host's CPU device, off any current mesh: for host-side bookkeeping
  (metric accumulation) inside a `mesh_context`, where every array made would otherwise be
  replicated on the devices of all hosts, and each tiny op a program launched on every local
  device and queued behind the train step."""
  with contextlib.ExitStack() as stack:
    if hasattr(jax, "set_mesh"):  # (older jax has no mesh to leave here)
      stack.enter_context(jax.set_mesh(None))
    stack.enter_context(jax.default_device(jax.local_devices(backend="cpu")[0]))
    yield


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  """Make `mesh` the current mesh and `rules` the logical axis rules (for constraints in models)."""
  with _use_mesh(mesh), nn.logical_axis_rules(axis_rules(rules)):
    yield


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract_arrays(tree, shardings) -> Any:
  """ShapeDtypeStructs of `tree`'s arrays placed on `shardings`: one sharding for every leaf, or a
  tree of them matching `tree` (a restore target, or the arrays an `eval_shape` will make)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def split_host_array(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """A host array that every process holds whole -> a global array split over the batch axes:
  each process gives its own devices their rows, so nothing moves between hosts."""
  return jax.make_array_from_callback(x.shape, batch_sharding(mesh, x.ndim),
                                      lambda index: x[index])


def replicated_to_host(x: jax.Array) -> np.ndarray:
  """A replicated (or one-process) array -> the whole array on the host, on every process."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def process_batch_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, ...]:
  """The rows of a global batch (sharded over the batch axes) that this process's devices hold,
  in the order `global_batch` takes them from the process's local batch (ascending)."""
  indices = batch_sharding(mesh, 1).devices_indices_map((global_batch_size,))
  rows = set()
  for device, (index,) in indices.items():
    if device.process_index == jax.process_index():
      rows.update(range(*index.indices(global_batch_size)))
  return tuple(sorted(rows))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assemble each process's slice of the batch into global arrays sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, np.ndim(v)), np.asarray(v))
          for k, v in local_batch.items()}
