"""Several devices and hosts through JAX itself: a device mesh, sharding rules, multi-process setup.

One train step serves 1 or N devices: it is jitted with the shardings given here,
and XLA's SPMD partitioner inserts the collectives (the gradient all-reduce over
the batch, the all-gathers of FSDP-sharded kernels). The mesh has two named axes:

    data   the batch is split over it; large kernels, their masks and optimizer
           slots are split over it too (fully sharded data parallel, FSDP:
           each device stores 1/data of a large leaf and the compiler gathers
           it for the matmul), small leaves are replicated;
    model  optional; splits the last (output) axis of large kernels.

Several processes (hosts) call `initialize` first, with the coordinator's
address, the number of processes and their own id, from flags or the
environment variables ``SPARSEJAX_COORDINATOR``, ``SPARSEJAX_NUM_PROCESSES``
and ``SPARSEJAX_PROCESS_ID`` (set by `experiments.launch`). On CPU the
collectives between processes go through gloo, which must be chosen before JAX
initializes its backend.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "batch_sharding",
    "blocking_steps",
    "host_to_global",
    "initialize",
    "make_mesh",
    "partition_spec",
    "replicated",
    "state_shardings",
    "steps_must_block",
    "to_host",
]

DATA_AXIS = "data"
MODEL_AXIS = "model"

ENV_COORDINATOR = "SPARSEJAX_COORDINATOR"
ENV_NUM_PROCESSES = "SPARSEJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SPARSEJAX_PROCESS_ID"


def _int_from(name: str, value: Any, env: str) -> int | None:
    if value is None:
        value = os.environ.get(env)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts `jax.distributed` when the run has more than one process.

    Arguments left as None are read from ``SPARSEJAX_COORDINATOR`` (``host:port``),
    ``SPARSEJAX_NUM_PROCESSES`` and ``SPARSEJAX_PROCESS_ID``. With one process (or
    none given) nothing happens. Call it before anything touches a JAX device.

    Args:
      coordinator_address: ``host:port`` of process 0's coordination service.
      num_processes: total number of processes, positive.
      process_id: this process's id in ``[0, num_processes)``.

    Returns:
      True if `jax.distributed.initialize` was called.

    Raises:
      ValueError: on a non-integer, non-positive or out-of-range value, or a
        missing coordinator address when ``num_processes > 1``.
    """
    num = _int_from("num_processes", num_processes, ENV_NUM_PROCESSES)
    pid = _int_from("process_id", process_id, ENV_PROCESS_ID)
    address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num is None or num == 1:
        if pid not in (None, 0):
            raise ValueError(f"process_id={pid} needs num_processes > 1, got {num}")
        return False
    if num < 1:
        raise ValueError(f"num_processes must be positive, got {num}")
    if pid is None or not 0 <= pid < num:
        raise ValueError(f"process_id must lie in [0, {num}), got {pid}")
    if not address or ":" not in address:
        raise ValueError(f"coordinator_address must be 'host:port', got {address!r}")
    # CPU backends have no collectives between processes unless one is chosen before
    # the backend starts; gloo ships with jaxlib. GPUs and TPUs bring their own.
    if os.environ.get("JAX_PLATFORMS", "cpu") in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=address, num_processes=num, process_id=pid)
    return True


def make_mesh(data: int = -1, model: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` device mesh.

    Args:
      data: size of the data axis; -1 takes every device not used by ``model``.
      model: size of the model axis (1: no model parallelism).
      devices: defaults to all devices of all processes (``jax.devices()``).
        With fewer mesh slots than devices the first ``data * model`` are used
        (one process only: a multi-process mesh must span every process).

    Returns:
      A `jax.sharding.Mesh` with axes ``('data', 'model')``.

    Raises:
      ValueError: if a size is not a positive integer (or -1 for ``data``), or
        ``data * model`` exceeds the number of devices or does not divide it.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not isinstance(model, int) or isinstance(model, bool) or model < 1:
        raise ValueError(f"mesh.model must be a positive integer, got {model!r}")
    if not isinstance(data, int) or isinstance(data, bool) or (data < 1 and data != -1):
        raise ValueError(f"mesh.data must be a positive integer or -1, got {data!r}")
    if data == -1:
        if len(devices) % model:
            raise ValueError(f"mesh.model={model} does not divide the {len(devices)} devices")
        data = len(devices) // model
    if data * model > len(devices):
        raise ValueError(
            f"mesh.data * mesh.model = {data} * {model} exceeds the {len(devices)} devices"
        )
    if jax.process_count() > 1 and data * model != len(devices):
        raise ValueError(
            f"mesh.data * mesh.model = {data * model} must equal the {len(devices)} devices "
            "of a multi-process run"
        )
    grid = np.array(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS))


def partition_spec(
    shape: Sequence[int], *, data_size: int, model_size: int = 1, min_size: int = 2**16
) -> PartitionSpec:
    """The sharding rule of one state leaf (parameter, mask, optimizer slot).

    Leaves with fewer than 2 axes or fewer than ``min_size`` entries are
    replicated (sharding them saves little and costs a collective). A large
    leaf puts its last axis on ``model`` when ``model_size > 1`` divides it,
    and its largest other axis that ``data_size`` divides on ``data`` (FSDP).

    Args:
      shape: the leaf's shape.
      data_size: size of the mesh's data axis.
      model_size: size of the mesh's model axis.
      min_size: smallest leaf (in entries) that is sharded.

    Returns:
      A `PartitionSpec` (``PartitionSpec()`` = replicated).
    """
    for name, value in (
        ("data_size", data_size),
        ("model_size", model_size),
        ("min_size", min_size),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) < min_size:
        return PartitionSpec()
    spec: list[str | None] = [None] * len(shape)
    if model_size > 1 and shape[-1] % model_size == 0:
        spec[-1] = MODEL_AXIS
    if data_size > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % data_size == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = DATA_AXIS
    return PartitionSpec(*spec)


def state_shardings(tree: PyTree, mesh: Mesh, *, min_size: int = 2**16) -> PyTree:
    """`NamedSharding` for every leaf of ``tree`` (arrays or `jax.ShapeDtypeStruct`).

    Applies `partition_spec` leaf by leaf, so params, masks (bool or bit-packed)
    and optimizer slots of a large kernel are split the same way whenever their
    shapes allow it.
    """
    data_size, model_size = mesh.shape[DATA_AXIS], mesh.shape[MODEL_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(
            mesh,
            partition_spec(x.shape, data_size=data_size, model_size=model_size, min_size=min_size),
        ),
        tree,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding of a value every device holds in full."""
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def host_to_global(tree: PyTree, sharding: NamedSharding | PyTree) -> PyTree:
    """Global arrays from host arrays that every process holds in full.

    Each process fills only its own devices' shards (``x[index]``), so this
    works unchanged for one or several processes.

    Args:
      tree: numpy arrays (the same values on every process).
      sharding: one sharding for every leaf, or a pytree of them.

    Returns:
      `jax.Array` leaves with the given shardings.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if isinstance(sharding, jax.sharding.Sharding):
        shardings = [sharding] * len(leaves)
    else:
        shardings = treedef.flatten_up_to(sharding)
    out = []
    for x, s in zip(leaves, shardings, strict=True):
        x = np.asarray(x)
        out.append(jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index]))
    return treedef.unflatten(out)


def to_host(tree: PyTree) -> PyTree:
    """Numpy copies of replicated global arrays (read from this process's first shard)."""

    def get(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(f"to_host needs a replicated array, got sharding {x.sharding}")
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(get, tree)


def steps_must_block(mesh: Mesh | None) -> bool:
    """Whether a program on ``mesh`` must finish before the host dispatches the next one.

    True when this process drives several CPU devices of the mesh, whose
    collectives XLA:CPU runs in-process. Those deadlock under JAX's asynchronous
    dispatch: while step t's all-reduce waits for all of the mesh's devices to
    join its rendezvous, the host already dispatches step t+1, and one device's
    ``Execute`` of t+1 can take that device's in-flight slot (a per-device
    semaphore) before its part of step t has started, so step t waits for a
    participant that never comes. XLA aborts the process after the collective
    timeout ("Expected 4 threads to join the rendezvous, but only 3 of them
    arrived"): observed on a 2-core host with
    ``--xla_force_host_platform_device_count=4``, in a plain jitted conv
    step as well as in the trainer, and never when each step is waited for.
    Waiting costs little on CPU, where the host has nothing else to overlap.
    Accelerators (their collectives run on the devices) and single-device
    meshes keep asynchronous dispatch.

    Args:
      mesh: the run's mesh; None means the default device (no collectives).

    Returns:
      True for a CPU mesh with more than one device of this process.
    """
    if mesh is None:
        return False
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return len(local) > 1 and all(d.platform == "cpu" for d in local)


def blocking_steps(mesh: Mesh | None, *fns: Callable[..., Any]) -> tuple[Callable[..., Any], ...]:
    """``fns`` unchanged, or wrapped to wait for their outputs when `steps_must_block` says so.

    The one place where a trainer's step functions learn whether they may run
    ahead of the devices: wrap every jitted function that runs collectives on
    ``mesh`` (train, eval and metric steps).

    Args:
      mesh: the mesh the functions are compiled for (None: no mesh).
      *fns: jitted functions returning pytrees of arrays.

    Returns:
      A tuple of functions with the same signatures and results.
    """
    if not steps_must_block(mesh):
        return fns

    def wrap(fn):
        @functools.wraps(fn)
        def wait_for(*args, **kwargs):
            return jax.block_until_ready(fn(*args, **kwargs))

        return wait_for

    return tuple(wrap(fn) for fn in fns)


def summary(mesh: Mesh) -> Mapping[str, int]:
    """Process and device counts of a run (for logs)."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "devices": int(mesh.devices.size),
        "data": mesh.shape[DATA_AXIS],
        "model": mesh.shape[MODEL_AXIS],
    }
