"""Device mesh, logical-axis rules, the shardings of state and batches, and multi-host start-up.

Parameters and activations carry logical axis names; `config.logical_axis_rules` maps them
to the mesh axes (data, fsdp, tensor). Parameters use 'embed' (model width), 'mlp' (MLP and
head hidden width), 'heads', 'kv' (head dim), 'proj' (projection outputs) and 'layers' (the
stacked axis of scanned blocks); activations use their own names ('batch', 'length',
'activation_embed', 'activation_mlp', 'activation_heads', 'activation_kv',
'activation_negatives'), so that sharding a weight's width over fsdp does not also shard
the activations' width (as in MaxText).
"""

import collections
import glob
import importlib.util
import os
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")
# The batch dimension of inputs and activations is split over both data-parallel axes.
BATCH_AXES = ("data", "fsdp")

# FSDP: every weight matrix's model-width axis ('embed', or 'proj' in the heads) is split
# over fsdp, so parameters, gradients, Adam moments and the EMA target each hold 1/fsdp per
# device; the step all-gathers a layer's weights before use and reduce-scatters its
# gradient. Tensor parallelism (Megatron style): attention heads and the MLP hidden width
# are split over tensor, in weights and activations alike; the activations' model width
# stays whole on each device. The InfoNCE logits [batch, negatives] are split over all
# three axes.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("proj", "fsdp"),
    ("layers", None),
    ("length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_negatives", "tensor"),
)


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """Sizes of the (data, fsdp, tensor) axes; one of them may be -1 for 'the rest'."""
    sizes = [int(mesh_cfg.get(axis, 1)) for axis in MESH_AXES]
    named = dict(zip(MESH_AXES, sizes))
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {named}.")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"config.mesh={named}: sizes must be positive (or -1 for the rest).")
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
    # compiler (GSPMD / Shardy) propagates them through the step. jax.make_mesh orders TPU
    # devices by their physical coordinates, so the inner axes (fsdp, tensor) ride the
    # fastest links; on several hosts 'data' is outermost and spans the hosts first.
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def _mesh_axes_value(axes: Any) -> Any:
    if isinstance(axes, list | tuple):
        return tuple(str(a) for a in axes) if len(axes) != 1 else str(axes[0])
    return axes if axes is None else str(axes)


def logical_axis_rules(rules_cfg: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Logical axis name -> mesh axes: the config's [name, axes] pairs, then DEFAULT_RULES.

    A name the config lists overrides its default entirely (e.g. ["embed", None] turns FSDP
    of the weights off); names it does not list keep their defaults.
    """
    rules = tuple((str(name), _mesh_axes_value(axes)) for name, axes in (rules_cfg or ()))
    named = {name for name, _ in rules}
    for name, axes in rules:
        for axis in (axes,) if isinstance(axes, str) else axes or ():
            if axis not in MESH_AXES:
                raise ValueError(
                    f"config.logical_axis_rules: {name!r} -> {axes!r} names mesh axis "
                    f"{axis!r}; the mesh axes are {MESH_AXES} (or None)."
                )
    return rules + tuple(rule for rule in DEFAULT_RULES if rule[0] not in named)


def mesh_and_rules(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> tuple[Mesh, tuple[tuple[str, Any], ...]]:
    """The mesh (config.mesh, over all devices or the given ones) and the logical-axis rules
    (config.logical_axis_rules) a run of `config` trains with."""
    return make_mesh(config.mesh, devices), logical_axis_rules(config.logical_axis_rules)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Inputs are split over their leading (batch) dimension across data and fsdp."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    """A fully replicated sharding on `mesh`."""
    return NamedSharding(mesh, PartitionSpec())


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """`spec` with every dimension that its mesh axes do not divide left unsplit."""
    entries = list(spec) + [None] * (len(shape) - len(spec))
    fitted = []
    for dim, axes in zip(shape, entries):
        names = (axes,) if isinstance(axes, str) else tuple(axes or ())
        ways = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        fitted.append(axes if dim % ways == 0 else None)
    return PartitionSpec(*fitted)


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """Mesh shardings for a tree whose leaves may carry logical names (nn.Partitioned).

    A dimension that the mesh axes of its rule do not divide (e.g. a 16-head kernel on
    tensor=32) stays whole on each device rather than failing; this is logged once per run.
    """
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), rules)
    unfit = []

    def shard(path, spec, leaf):
        fitted = fit_spec(spec, leaf.shape, mesh)
        if tuple(fitted) != tuple(spec) + (None,) * (len(leaf.shape) - len(spec)):
            unfit.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {spec}")
        return NamedSharding(mesh, fitted)

    shardings = jax.tree_util.tree_map_with_path(
        shard,
        mesh_specs,
        nn.meta.unbox(boxed_tree),
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )
    if unfit:
        logging.warning(
            "%d leaves keep a dimension whole because the mesh %s does not divide it, e.g. %s",
            len(unfit),
            dict(mesh.shape),
            unfit[0],
        )
    return shardings


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


# ---------------------------------------------------------------------------- Multi-host


def detected_cluster() -> str | None:
    """The multi-process environment this process was started in, if any (no JAX calls).

    SLURM (srun with more than one task), Open MPI (mpirun with more than one rank) or a
    Cloud TPU VM (libtpu installed and a TPU attached). On these jax.distributed.initialize()
    finds the coordinator, process count and id by itself.
    """
    env = os.environ
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "openmpi"
    # TPU chips show up as /dev/accel* (v2-v4) or /dev/vfio/N (v5e, v5p, v6e).
    tpu_attached = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    if tpu_attached and importlib.util.find_spec("libtpu") is not None:
        return "tpu"
    return None


def initialize_distributed(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
    heartbeat_timeout_seconds: int = 120,
) -> bool:
    """Starts jax.distributed before any JAX computation when the run spans processes.

    mode 'auto': explicitly given coordinator/process arguments, or a detected cluster
    (SLURM, Open MPI, Cloud TPU VM); 'on': always (auto-detection must then succeed);
    'off': never. `local_device_ids` are the accelerators this process drives: under SLURM
    and Open MPI JAX otherwise takes one GPU per process (the one of its local rank), so a
    process per node must list all of its GPUs. A process silent for
    `heartbeat_timeout_seconds` counts as dead: the coordination service then stops the
    others with an error naming it. Returns whether it initialised.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode {mode!r} is not one of 'auto', 'on', 'off'.")
    explicit = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {k: v for k, v in explicit.items() if v is not None and v != ""}
    if mode == "off":
        if given:
            raise ValueError(f"distributed mode 'off' contradicts the given {sorted(given)}.")
        return False
    if given and len(given) < len(explicit):
        missing = sorted(set(explicit) - set(given))
        raise ValueError(
            f"Multi-process start needs coordinator_address, num_processes and process_id "
            f"together; missing {missing}."
        )
    cluster = detected_cluster()
    if not given and mode == "auto" and cluster is None:
        return False
    # CPU processes exchange collectives over TCP with gloo (the default now; set it
    # explicitly so a changed default cannot turn multi-process CPU runs into errors).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if local_device_ids is not None:
        given["local_device_ids"] = list(local_device_ids)
    jax.distributed.initialize(**given, heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    logging.info(
        "jax.distributed: process %d of %d (%s), %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        "explicit" if "process_id" in given else cluster or "auto-detected",
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
