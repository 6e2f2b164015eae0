"""Device meshes and logical-axis sharding.

Parameters and activations are annotated with logical axis names (``"embed"``,
``"mlp"``, ``"heads"``, ``"batch"``, ...). One rules table in config maps each logical
name to mesh axes, so data parallelism, FSDP and tensor parallelism differ only in the
mesh shape and the table, never in model code:

    mesh (8, 1, 1)  data parallel: every parameter replicated
    mesh (1, 8, 1)  FSDP: "embed" dimensions split over "fsdp"
    mesh (1, 1, 8)  tensor parallel: "mlp", "heads" and "vocab" split over "tensor"
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of inputs and activations is split over these mesh axes.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
    """Resolves (data, fsdp, tensor) sizes from config; one of them may be -1."""
    wanted = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    free = [a for a, s in wanted.items() if s == -1]
    if len(free) > 1 or any(s == 0 or s < -1 for s in wanted.values()):
        raise ValueError(f"mesh sizes must be positive with at most one -1, got {wanted}")
    known = math.prod(s for s in wanted.values() if s != -1)
    if free:
        if num_devices % known:
            raise ValueError(
                f"mesh {wanted} cannot fill {num_devices} devices: {num_devices} is not "
                f"divisible by {known}")
        wanted[free[0]] = num_devices // known
    shape = tuple(wanted[a] for a in MESH_AXES)
    if math.prod(shape) != num_devices:
        raise ValueError(
            f"mesh (data, fsdp, tensor) = {shape} needs {math.prod(shape)} devices, but "
            f"{num_devices} are available; change config.mesh (one axis may be -1)")
    return shape


def make_mesh(mesh_config, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh of config, checked against the device count.

    ``mesh_config.dcn_data > 1`` spreads the data axis over that many slices (pods
    joined by the data-centre network); the other axes stay within a slice, where
    the interconnect is fast.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    dcn_data = int(mesh_config.get("dcn_data", 1))
    if dcn_data > 1:
        if shape[0] % dcn_data:
            raise ValueError(
                f"config.mesh.dcn_data={dcn_data} must divide the data axis ({shape[0]})")
        if not hasattr(devices[0], "slice_index"):
            raise ValueError("config.mesh.dcn_data > 1 needs multi-slice devices")
        ici_shape = (shape[0] // dcn_data,) + shape[1:]
        arranged = mesh_utils.create_hybrid_device_mesh(
            ici_shape, (dcn_data, 1, 1), devices)
    else:
        try:
            arranged = mesh_utils.create_device_mesh(shape, devices)
        except (ValueError, NotImplementedError, AssertionError):
            # Topology-aware placement is for TPUs/GPUs; elsewhere keep device order.
            arranged = np.asarray(devices).reshape(shape)
    return Mesh(arranged, MESH_AXES)


def logical_rules(sharding_config) -> tuple[tuple[str, Any], ...]:
    """The rules table of config as flax expects it (lists become tuples)."""
    rules = []
    for logical, mesh_axes in sharding_config.rules:
        if isinstance(mesh_axes, (list, tuple)):
            mesh_axes = tuple(mesh_axes)
        rules.append((logical, mesh_axes))
    return tuple(rules)


def logical_shardings(abstract_boxed_tree, mesh: Mesh, rules) -> Any:
    """NamedShardings for a tree whose leaves may carry logical partitioning boxes."""
    specs = nn.get_partition_spec(abstract_boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: leading dimension over the mesh's batch axes."""
    return NamedSharding(mesh, PartitionSpec(tuple(a for a in BATCH_AXES
                                                   if a in mesh.axis_names)))


def batch_shard_count(mesh: Mesh) -> int:
    """Into how many parts :func:`batch_sharding` splits a batch."""
    return math.prod(mesh.shape[a] for a in BATCH_AXES if a in mesh.axis_names)


def make_global_batch(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Turns a per-process batch into global ``jax.Array``s laid out as
    :func:`batch_sharding`.

    Every process passes its own rows; the leading dimension of each result is the
    global batch. Non-numeric entries (captions) are left out.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v)
            for k, v in batch.items() if v.dtype != object}


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def indivisible_arrays(tree) -> list[str]:
    """One line per array of ``tree`` (leaves with a ``NamedSharding``) whose shape its
    sharding does not split evenly: the path, the shape and the mesh axes at fault."""
    problems = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(sharding, NamedSharding):
            continue
        for dim, (size, axes) in enumerate(zip(leaf.shape, sharding.spec)):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % parts:
                problems.append(
                    f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)}: dimension {dim} "
                    f"({size}) does not split over {' x '.join(axes)} ({parts})")
    return problems


def sharding_report(tree, *, min_size: int = 2**14) -> list[dict[str, Any]]:
    """Per large array: path, shape, spec and the fraction each device holds."""
    rows = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "sharding") or leaf.size < min_size:
            continue
        shard_shape = leaf.sharding.shard_shape(leaf.shape)
        rows.append({
            "path": jax.tree_util.keystr(path),
            "shape": tuple(leaf.shape),
            "spec": getattr(leaf.sharding, "spec", None),
            "fraction_per_device": math.prod(shard_shape) / max(1, leaf.size),
        })
    return rows


def unsharded_large_arrays(tree, mesh: Mesh, *, min_size: int = 2**14,
                           axes: Sequence[str] = ("fsdp", "tensor")) -> list[str]:
    """Paths of large arrays left whole on each device although ``axes`` could split them.

    An array counts as unsharded when each device holds all of it while the product of
    the sizes of ``axes`` in the mesh is above 1.
    """
    splits = math.prod(mesh.shape[a] for a in axes if a in mesh.shape)
    if splits == 1:
        return []
    return [row["path"] for row in sharding_report(tree, min_size=min_size)
            if row["fraction_per_device"] == 1.0]
