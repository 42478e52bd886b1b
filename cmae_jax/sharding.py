"""Device mesh, logical-axis rules and the shardings of state and batches."""

import collections
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Sizes of the (data, fsdp, tensor) axes; one of them may be -1 for 'the rest'."""
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    named = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {named}.")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(
                f"config.mesh={named}: {num_devices} devices are not divisible "
                f"by the fixed axes' product {known}; change config.mesh."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"config.mesh={named} needs {int(np.prod(sizes))} devices but "
            f"{num_devices} are attached; set one axis to -1 or fix the sizes."
        )
    return tuple(sizes)


def make_mesh(
    mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices (or the given ones)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: shardings are given at jit boundaries and by logical constraints, and the
    # compiler (GSPMD / Shardy) propagates them through the step.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_axis_rules(rules_cfg: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Logical axis name -> mesh axes, from the config (a list of [name, axes] pairs)."""
    default = (("batch", BATCH_AXES),)
    if not rules_cfg:
        return default
    rules = tuple(
        (str(name), tuple(axes) if isinstance(axes, list) else axes) for name, axes in rules_cfg
    )
    if not any(name == "batch" for name, _ in rules):
        rules = (*default, *rules)
    return rules


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs are split over their leading (batch) dimension across data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Mesh shardings for a tree whose leaves may carry logical names (nn.Partitioned)."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def global_batch(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding
) -> dict[str, jax.Array]:
    """Turns this process's rows of a batch into global arrays sharded over the batch axis."""
    return {
        key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
        for key, value in local_batch.items()
    }


def prefetch_to_devices(
    batches: Iterator[dict[str, np.ndarray]], sharding: NamedSharding, size: int = 2
) -> Iterator[dict[str, jax.Array]]:
    """Keeps `size` global batches in flight to the devices while the step runs."""
    queue = collections.deque()
    for local in batches:
        queue.append(global_batch(local, sharding))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
