"""Multi-process runs (several hosts, or one process per GPU): start-up and host collectives.

Every process runs the same program. `jax.distributed.initialize` connects them; from then on
`jax.devices()` lists the devices of all processes, and a jitted computation over a mesh of
them (the train step, the SFT step, model creation) runs on all devices at once, each process
calling it with the same shapes. The host work of a step is split instead of repeated:

    prompts of step s      P prompts (the same list on every process: a function of s)
    process p rolls out    prompts [p P/n, (p + 1) P/n)   (n processes; whole GRPO groups)
                           on its own devices, with a process-local copy of the weights
                           (`local_mesh`, `local_copy`); episode k of the block has the global
                           id p B/n + k (B = P x group size), so the sampler draws for it
                           the random numbers one process sampling the whole batch would
    scores and metrics     per-episode numbers gathered to every process (`allgather_objects`)
                           and reduced there with the single-process code, in the global order
    the train batch        each process's rows become its block of one global array
                           (`global_batch`), padded to the longest episode of any process

so a run on n processes writes the metrics a one-process run on the same mesh writes (see
`tests/test_multihost.py` for how exactly). The workdir must be one shared directory (NFS,
Lustre, a GCS-fuse mount ...): checkpoints are written by all processes together and the
trained tokenizer is read by all; only process 0 writes metrics and samples.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grpo_jax import sharding as sharding_lib

log = logging.getLogger(__name__)

# Environment variables read when no explicit value is given (the first is jax's own).
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"


# ---------------------------------------------------------------------------------------------
# Start-up.
# ---------------------------------------------------------------------------------------------
def cluster_hint(environ: Mapping[str, str] | None = None) -> str | None:
    """Why this environment looks like a multi-process launch, or None.

    "env" when `JAX_COORDINATOR_ADDRESS` is set; "slurm" inside a SLURM step of several tasks;
    "mpi" under Open MPI with several ranks. (A TPU pod is only recognised by a metadata-server
    query inside `jax.distributed.initialize`: pass `--distributed` there.)
    """
    env = os.environ if environ is None else environ
    if env.get(ENV_COORDINATOR):
        return "env"
    tasks = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS")
    if tasks and int(tasks) > 1 and "SLURM_PROCID" in env:
        return "slurm"
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "mpi"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               *, initialization_timeout: int = 300) -> tuple[int, int]:
    """Connects this process to the others; returns (process index, process count).

    Each value is taken from the argument, else from the environment (`JAX_COORDINATOR_ADDRESS`,
    `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`, `JAX_LOCAL_DEVICE_IDS`), else left to
    `jax.distributed.initialize`, which discovers it on Cloud TPU pods, SLURM and Open MPI.
    On CPU the processes exchange data through gloo over TCP. Must run before anything touches
    a device; a second call (already initialised) only returns the indices.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
        num_processes = int(os.environ[ENV_NUM_PROCESSES])
    if process_id is None and os.environ.get(ENV_PROCESS_ID):
        process_id = int(os.environ[ENV_PROCESS_ID])
    # Cross-process collectives of the CPU backend (the default in recent jax; harmless on
    # GPU/TPU, where only CPU-side arrays would use it).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=initialization_timeout)
    log.info("process %d of %d: %d local devices of %d", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_index(), jax.process_count()


def maybe_initialize(mode: str = "auto", coordinator_address: str | None = None,
                     num_processes: int | None = None, process_id: int | None = None) -> bool:
    """`initialize` as an entry point's flags ask; returns whether it ran.

    mode "on": always (missing values discovered); "off": never; "auto": when a value is given
    or `cluster_hint()` recognises a multi-process launch.
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"distributed mode must be auto, on or off, got {mode!r}")
    explicit = any(v is not None for v in (coordinator_address, num_processes, process_id))
    if mode == "off" or (mode == "auto" and not explicit and cluster_hint() is None):
        return False
    initialize(coordinator_address, num_processes, process_id)
    return True


def is_multiprocess() -> bool:
    return jax.process_count() > 1


# ---------------------------------------------------------------------------------------------
# Host collectives (every process must call them, in the same order).
# ---------------------------------------------------------------------------------------------
def _gather_bytes(payload: bytes) -> list[bytes]:
    from jax.experimental import multihost_utils

    sizes = multihost_utils.process_allgather(np.asarray([len(payload)], np.int64))
    sizes = [int(s) for s in np.asarray(sizes).reshape(-1)]
    # Padded to a power of two: the gather compiles once per padded size, not per message.
    width = 1 << max(max(sizes) - 1, 1).bit_length()
    buffer = np.zeros(width, np.uint8)
    buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
    gathered = np.asarray(multihost_utils.process_allgather(buffer)).reshape(len(sizes), width)
    return [gathered[p, :sizes[p]].tobytes() for p in range(len(sizes))]


def allgather_objects(obj: Any) -> list[Any]:
    """[the `obj` of process 0, of process 1, ...] on every process (pickled; small host data:
    per-episode numbers, flags). One process: `[obj]`, nothing sent."""
    if not is_multiprocess():
        return [obj]
    return [pickle.loads(b) for b in _gather_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))]


def concat_rows(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-process dicts of per-row arrays -> one dict, rows in process order."""
    return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is true on any (e.g. a signal one process received)."""
    return any(allgather_objects(bool(flag)))


def barrier(name: str):
    """Waits until every process reaches the barrier of this name."""
    if is_multiprocess():
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


# ---------------------------------------------------------------------------------------------
# Who does which rows.
# ---------------------------------------------------------------------------------------------
def process_block(num_items: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, stop) of this process's contiguous share of `num_items` (sizes differ by at most 1;
    process 0 takes the first, larger ones)."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    base, extra = divmod(num_items, count)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def _rows_on_process(sharding, global_shape) -> list[tuple[jax.Device, int, int]]:
    """(device, first row, stop row) of each addressable device of a row-sharded array."""
    out = []
    for device, index in sharding.addressable_devices_indices_map(tuple(global_shape)).items():
        rows = index[0] if index else slice(None)
        start, stop, _ = rows.indices(global_shape[0])
        out.append((device, start, stop))
    return out


def _devices_by_process() -> list[list]:
    """Every process's devices (by id), in process order."""
    by_process: dict[int, list] = {}
    for d in jax.devices():
        by_process.setdefault(d.process_index, []).append(d)
    return [sorted(by_process[p], key=lambda d: d.id) for p in sorted(by_process)]


def _process_layout() -> Mesh:
    """A (process, local) mesh: row blocks by process index, replicated over a process's devices."""
    return Mesh(np.asarray(_devices_by_process(), dtype=object), ("process", "local"))


def global_batch(local: Mapping[str, np.ndarray], sharding_for: Callable[[int], Any],
                 num_rows: int) -> dict[str, jax.Array]:
    """One global array per entry, from each process's block of rows.

    `local[k]` holds rows [start, stop) of the global [num_rows, ...] array (this process's
    `process_block(num_rows)`); `sharding_for(ndim)` is the sharding the consumer (the train
    step) expects. When the sharding puts exactly this process's block on its devices (the
    usual layout: the mesh lists devices process by process) each device gets its slice
    directly; otherwise the rows are placed by process and moved to `sharding_for` on device.
    """
    start, stop = process_block(num_rows)
    out = {}
    for name, block in local.items():
        block = np.asarray(block)
        if block.shape[0] != stop - start:
            raise ValueError(f"{name}: this process holds {block.shape[0]} rows, its block is "
                             f"[{start}, {stop}) of {num_rows}")
        shape = (num_rows,) + block.shape[1:]
        sharding = sharding_for(block.ndim)
        placement = _rows_on_process(sharding, shape)
        if all(start <= a and b <= stop for _, a, b in placement):
            shards = [jax.device_put(block[a - start:b - start], d) for d, a, b in placement]
            out[name] = jax.make_array_from_single_device_arrays(shape, sharding, shards)
            continue
        by_process = NamedSharding(_process_layout(), PartitionSpec("process"))
        if num_rows % jax.process_count():
            raise ValueError(f"{num_rows} rows do not split evenly over {jax.process_count()} processes")
        staged = jax.make_array_from_process_local_data(by_process, block, shape)
        out[name] = jax.device_put(staged, sharding)
    return out


# ---------------------------------------------------------------------------------------------
# A process-local copy of the weights, for sampling.
# ---------------------------------------------------------------------------------------------
def local_axis_sizes(mesh: Mesh, num_local: int) -> dict[str, int]:
    """Axis sizes of a mesh of `num_local` devices that shards like `mesh` within one process:
    each size divides the global one (so every global PartitionSpec stays valid), filled from
    the innermost axis (tp, then fsdp, then data); {} when no such split exists."""
    sizes, left = {}, num_local
    for axis in reversed(mesh.axis_names):
        sizes[axis] = math.gcd(mesh.shape[axis], left)
        left //= sizes[axis]
    return {a: sizes[a] for a in mesh.axis_names} if left == 1 else {}


def _local_grid(mesh: Mesh, devices: Sequence) -> np.ndarray:
    """One process's devices arranged like `mesh` (`local_axis_sizes`); without such a split,
    all of them along the first axis (the data axis: weights replicated)."""
    sizes = local_axis_sizes(mesh, len(devices))
    shape = (tuple(sizes[a] for a in mesh.axis_names) if sizes
             else (len(devices),) + (1,) * (len(mesh.axis_names) - 1))
    if sizes and tuple(mesh.axis_names) == sharding_lib.MESH_AXES:
        try:  # the topology-aware order of accelerators (tp neighbours on the fastest links)
            return sharding_lib.make_mesh(*shape, devices=devices).devices
        except Exception:  # noqa: BLE001  (a host's chips need not form a mesh the helper knows)
            pass
    return np.asarray(devices, dtype=object).reshape(shape)


def local_mesh(mesh: Mesh) -> Mesh:
    """The mesh of this process's devices, axes named like `mesh` (sizes: `local_axis_sizes`)."""
    devices = sorted(jax.local_devices(), key=lambda d: d.id)
    return Mesh(_local_grid(mesh, devices), mesh.axis_names)


def local_copy(tree, mesh: Mesh) -> Any:
    """`tree` (arrays sharded over the global `mesh`) copied onto this process's devices.

    Each array keeps its PartitionSpec, now over `local_mesh(mesh)` (an axis whose local size
    does not divide the dimension is dropped: replicated). The transfer is one on-device
    reshard, to a mesh that stacks every process's local mesh along a leading "process" axis
    (replicated over it); each process then keeps the shards on its own devices.
    """
    own = local_mesh(mesh)
    stacked = np.stack([_local_grid(mesh, devices) for devices in _devices_by_process()])
    replicas = Mesh(stacked, ("process",) + tuple(mesh.axis_names))

    def local_spec(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else PartitionSpec()
        entries = []
        for dim, entry in enumerate(tuple(spec) + (None,) * (x.ndim - len(spec))):
            axes = () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))
            fits = all(a in own.shape for a in axes) and x.shape[dim] % math.prod(
                own.shape.get(a, 1) for a in axes) == 0
            entries.append(entry if fits else None)
        return PartitionSpec(*entries)

    def one(x):
        if not isinstance(x, jax.Array):
            return x
        spec = local_spec(x)
        moved = jax.device_put(x, NamedSharding(replicas, spec))
        shards = [s.data for s in moved.addressable_shards]
        return jax.make_array_from_single_device_arrays(x.shape, NamedSharding(own, spec), shards)

    return jax.tree.map(one, tree)
