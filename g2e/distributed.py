"""Multi-host set-up: `jax.distributed`, the device mesh, and moving data between hosts.

Every g2e process runs the same program (SPMD). On one host that is one process seeing all local
accelerators; on a TPU pod slice, a multi-slice job or a SLURM allocation it is one process per
host (or per GPU), and `initialize` connects them before anything touches a device. After that:

- `make_mesh` lays the ('data', 'fsdp', 'tensor') mesh over all devices of all hosts: tensor is
  innermost (fastest links), then fsdp, then data; with several TPU slices only `data` crosses
  slices (data-parallel over the data-centre network, fsdp and tensor inside one slice).
- Host data: every process reads only its share of a list (`host_slice`), assembles its rows
  into global arrays (`put_batch`, the batch dimension over the mesh axes of the 'batch'
  sharding rule), and per-item results are gathered back in input order (`gather_in_order`).
- Every process must run the same jitted computations with the same global shapes in the same
  order (a mismatch hangs or aborts the job). A per-item loop (embedding for evaluation or
  mining) therefore runs `num_host_batches` steps on every host (short shares feed padding
  rows) and agrees on each step's padded shape (length / patch bucket) with one
  `max_across_processes` call up front:

      mine = items[host_slice(len(items))]
      steps = num_host_batches(len(items), local_batch_size)
      chunks = [mine[s * local_batch_size:(s + 1) * local_batch_size] for s in range(steps)]
      lengths = max_across_processes([bucket_of(chunk) for chunk in chunks])
      for chunk, length in zip(chunks, lengths):
          batch = put_batch(collate(chunk, length, rows=local_batch_size), mesh, rules)
          outputs.append(local_rows(embed_step(batch))[:len(chunk)])
      embeddings = gather_in_order(np.concatenate(outputs), len(items))
- Only the primary process (`is_primary`) writes logs, reports and exports; Orbax checkpoints
  are written by all processes together (Orbax coordinates that itself). An export or adapter
  gathered from sharded arrays is written with `write_on_primary`: every process takes part
  in the gathers, process 0 writes.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from g2e import atomic
from g2e.models import sharding

MESH_AXES = ("data", "fsdp", "tensor")


# --------------------------------------------------------------------------------------------
# jax.distributed


def _positive_int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env.get(key, "0"))
    except ValueError:
        return 0


def _count_list(value: str) -> int:
    return len([part for part in value.split(",") if part.strip()])


def _on_cloud_tpu_vm() -> bool:
    """True when TPU chips are attached to this machine (a Cloud TPU VM)."""
    try:
        # jax's own PCI scan (the same one it runs to pick the TPU backend); private, so guarded.
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except (ImportError, AttributeError, OSError):
        return False


def distributed_reason(
    config: Any, env: Mapping[str, str] | None = None, on_tpu_vm: bool | None = None
) -> str | None:
    """Why this process must join a multi-process job, or None for a single-process run.

    Args:
      config: the experiment config; `config.distributed.coordinator_address` (non-empty) asks
        for an explicit set-up with `num_processes` and `process_id`.
      env: environment variables (default os.environ).
      on_tpu_vm: whether TPU chips are attached (default: scan the PCI bus).

    Returns:
      'config', 'slurm', 'mpi', 'tpu' (multi-worker TPU environment variables) or 'tpu_vm'
      (a Cloud TPU VM: JAX reads the worker list from the metadata server; a single-host VM
      becomes a one-process job, which is harmless), or None.
    """
    env = os.environ if env is None else env
    settings = config.get("distributed") if hasattr(config, "get") else None
    if settings is not None and settings.get("coordinator_address", ""):
        return "config"
    # srun sets the step variables; a script that merely runs inside an allocation (no srun)
    # lacks SLURM_STEP_NODELIST and stays single-process.
    if (
        "SLURM_JOB_ID" in env
        and "SLURM_STEP_NODELIST" in env
        and "SLURM_PROCID" in env
        and _positive_int(env, "SLURM_NTASKS") > 1
    ):
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and _positive_int(env, "OMPI_COMM_WORLD_SIZE") > 1:
        return "mpi"
    if (
        _count_list(env.get("TPU_WORKER_HOSTNAMES", "")) > 1
        or _count_list(env.get("TPU_PROCESS_ADDRESSES", "")) > 1
        or env.get("MEGASCALE_COORDINATOR_ADDRESS")
        or _positive_int(env, "MEGASCALE_NUM_SLICES") > 1
    ):
        return "tpu"
    # A TPU VM run pinned to other platforms (JAX_PLATFORMS=cpu) stays single-process.
    if "TPU_SKIP_MDS_QUERY" not in env and "tpu" in env.get("JAX_PLATFORMS", "tpu"):
        if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
            return "tpu_vm"
    return None


def initialize(config: Any) -> None:
    """Calls `jax.distributed.initialize()` when the environment calls for it; idempotent.

    Must run before any JAX computation. The cases (see `distributed_reason`):
      - explicit: `--config.distributed.coordinator_address=HOST:PORT` with
        `distributed.num_processes` and `distributed.process_id` (same address on every process);
      - SLURM (`srun` with more than one task), Open MPI (`mpirun -n >1`), TPU pod slices and
        multi-slice jobs: JAX detects the coordinator, process count and id itself;
      - anything else (one host, any number of local devices): nothing to do.

    Raises:
      ValueError: explicit coordinator without a valid `num_processes` / `process_id`.
    """
    if jax.distributed.is_initialized():
        return
    reason = distributed_reason(config)
    if reason is None:
        return
    if reason == "config":
        _initialize_explicitly(config.distributed)
    else:
        _initialize_detected(reason)
    # The first cross-process collective sets up the CPU (Gloo) context and gives up after 30 s
    # if a process arrives later; done here, while all are in step, later barriers may wait
    # as long as the primary needs (e.g. while it alone prepares the demo).
    barrier("g2e-initialize")
    logging.info(
        "process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _initialize_explicitly(settings: Any) -> None:
    """jax.distributed.initialize with the `distributed` config block's coordinator, process
    count and id, each checked first."""
    num_processes, process_id = int(settings.num_processes), int(settings.process_id)
    if num_processes < 1:
        raise ValueError(
            f"--config.distributed.num_processes is {num_processes}, but "
            f"distributed.coordinator_address={settings.coordinator_address!r} is set; give "
            "the total number of processes (the same on every host)."
        )
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"--config.distributed.process_id is {process_id}; give this process's id in "
            f"[0, {num_processes}) (distributed.num_processes={num_processes}), unique per "
            "process, 0 on the coordinator's host."
        )
    logging.info(
        "jax.distributed: coordinator %s, process %d of %d",
        settings.coordinator_address,
        process_id,
        num_processes,
    )
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
    )


def _initialize_detected(reason: str) -> None:
    """jax.distributed.initialize in an environment JAX recognises itself (SLURM, MPI, TPU)."""
    logging.info("jax.distributed: auto-detected %s environment", reason)
    tasks_here = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "")
    if (
        reason == "slurm"
        and "JAX_LOCAL_DEVICE_IDS" not in os.environ
        and (tasks_here == "1" or tasks_here.startswith("1("))
    ):
        # JAX gives each SLURM task only the GPU numbered SLURM_LOCALID.
        logging.warning(
            "One SLURM task on this node sees only GPU %s; to use all its GPUs "
            "export JAX_LOCAL_DEVICE_IDS=0,1,...,N-1 (launch/slurm.sbatch does).",
            os.environ.get("SLURM_LOCALID", "0"),
        )
    jax.distributed.initialize()


def is_primary() -> bool:
    """True on the one process (index 0) that writes logs, reports and exports."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier `name` (no-op with one process).

    Use it after the primary process writes a file that the others then read.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def write_on_primary(
    directory: str | os.PathLike, write: Callable[[pathlib.Path | None], Any]
) -> None:
    """Process 0 writes `directory` whole (`g2e.atomic.replace_directory(directory, write)`);
    every other process calls `write(None)`.

    For outputs gathered from arrays that span hosts (a model, its adapters): `write` runs the
    same gathers on every process, so all take part, and writes only when given a folder.
    Every process must call this at the same point.
    """
    if is_primary():
        atomic.replace_directory(directory, write)
    else:
        write(None)


# --------------------------------------------------------------------------------------------
# The mesh


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes from the `mesh` config, with -1 = the rest of the devices.

    Raises:
      ValueError: naming the `mesh.*` key when the sizes cannot tile `num_devices`.
    """
    sizes = {}
    for axis in MESH_AXES:
        size = mesh_config[axis]
        if not isinstance(size, (int, np.integer)) or (size < 1 and size != -1):
            raise ValueError(f"mesh.{axis}={size!r}: use a positive size or -1 for the rest")
        sizes[axis] = int(size)
    rest = [axis for axis in MESH_AXES if sizes[axis] == -1]
    if len(rest) > 1:
        raise ValueError(
            f"mesh.{rest[0]} and mesh.{rest[1]} are both -1; at most one axis "
            "takes the rest of the devices"
        )
    fixed = math.prod(size for size in sizes.values() if size != -1)
    for axis in MESH_AXES:
        if sizes[axis] != -1 and num_devices % sizes[axis]:
            raise ValueError(f"mesh.{axis}={sizes[axis]} does not divide {num_devices} devices")
    if num_devices % fixed:
        raise ValueError(
            "mesh."
            + "*mesh.".join(a for a in MESH_AXES if sizes[a] != -1)
            + f" = {fixed} does not divide {num_devices} devices"
        )
    if rest:
        sizes[rest[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh.data*mesh.fsdp*mesh.tensor = {fixed} but there are {num_devices} devices; "
            "set one axis to -1 to take the rest"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
    """Places `devices` on a (data, fsdp, tensor) grid.

    One slice: `create_device_mesh` (topology-aware on TPU; process-major on CPU/GPU, so tensor
    and fsdp stay inside a host as far as their sizes allow and `data` spans hosts). Several TPU
    slices (devices with distinct `slice_index`): `create_hybrid_device_mesh` with the data axis
    split across slices, fsdp and tensor inside each slice.

    Raises:
      ValueError: when `mesh.data` is not a multiple of the number of slices.
    """
    data, fsdp, tensor = shape
    num_slices = len({getattr(device, "slice_index", 0) for device in devices})
    if num_slices == 1:
        return mesh_utils.create_device_mesh((data, fsdp, tensor), devices)
    if data % num_slices:
        raise ValueError(
            f"mesh.data={data} is not a multiple of the {num_slices} slices: only the data axis "
            "crosses slices (fsdp and tensor stay inside one slice of "
            f"{len(devices) // num_slices} devices); make mesh.data a multiple of {num_slices}"
        )
    return mesh_utils.create_hybrid_device_mesh(
        (data // num_slices, fsdp, tensor), (num_slices, 1, 1), devices
    )


def make_mesh(mesh_config: Any, devices: Sequence[Any] | None = None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over all devices (of all processes).

    Args:
      mesh_config: the `mesh` config (keys data, fsdp, tensor; -1 = the rest).
      devices: default jax.devices().

    Axis types are Auto (jax 0.10's `jax.make_mesh` would default to Explicit), so shardings
    propagate through jit as in GSPMD and the model's `with_sharding_constraint`s apply.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return Mesh(device_grid(shape, devices), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


# --------------------------------------------------------------------------------------------
# Data across hosts


def host_slice(
    n_items: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """This process's contiguous share of `n_items` items, in order.

    Shares differ by at most one item; earlier processes take the extra ones, so concatenating
    the shares of processes 0, 1, ... gives the items in their original order.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    base, extra = divmod(n_items, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (index < extra))


def num_host_batches(n_items: int, local_batch_size: int) -> int:
    """Steps every process runs to cover its `host_slice` of `n_items` in local batches.

    The same on every process (the largest share decides), so all of them call the jitted step
    equally often; processes with fewer items feed padding rows.
    """
    if local_batch_size < 1:
        raise ValueError(f"local_batch_size is {local_batch_size}; it must be positive")
    largest_share = -(-n_items // jax.process_count())
    return -(-largest_share // local_batch_size)


def max_across_processes(values: Sequence[int]) -> tuple[int, ...]:
    """Element-wise maximum of small integer vectors over all processes (e.g. padded shapes).

    Every process must call it at the same point with the same number of values.
    """
    return tuple(int(v) for v in every_process(values).max(axis=0))


_agreements = itertools.count()  # every_process calls so far (the same on every process)


def every_process(values: Sequence[int], timeout_s: float = 600) -> np.ndarray:
    """int32 [processes, n]: row p holds process p's small integer vector `values`.

    Every process must call it at the same point with the same number of values. It goes
    through the coordination service's key-value store, not the devices, so it does not queue
    behind a running step (training agrees on every step's shapes while the previous step
    runs). A process deletes its key of two calls back: by then every process has read it.
    """
    local = np.asarray(values, np.int32).reshape(-1)
    if jax.process_count() == 1:
        return local[None]
    client, call, me = _coordination_client(), next(_agreements), jax.process_index()
    client.key_value_set_bytes(f"g2e/agree/{call}/{me}", local.tobytes())
    rows = [
        np.frombuffer(
            client.blocking_key_value_get_bytes(f"g2e/agree/{call}/{p}", int(timeout_s * 1000)),
            np.int32,
        )
        for p in range(jax.process_count())
    ]
    if call >= 2:
        client.key_value_delete(f"g2e/agree/{call - 2}/{me}")
    return np.stack(rows)


def _coordination_client() -> Any:
    """The client of jax.distributed's coordination service (JAX has no public handle)."""
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def text_from_process(source: int, text: str | None, key: str, timeout_s: float = 300) -> str:
    """The text that process `source` passes (its `text`), on every process.

    Through the coordination service's key-value store, not the devices: for an error
    message that every process raises alike. `key` must be unique per call in the job.

    Raises:
      ValueError: process `source` is this one and `text` is None.
    """
    client = _coordination_client()
    if jax.process_index() == source:
        if text is None:
            raise ValueError(f"text_from_process({key!r}): the source process gives no text")
        if jax.process_count() > 1:
            client.key_value_set(f"g2e/{key}", text)
        return text
    return client.blocking_key_value_get(f"g2e/{key}", int(timeout_s * 1000))


def gather_in_order(local_array: np.ndarray, n_total: int) -> np.ndarray:
    """Concatenates every process's `local_array` (its `host_slice(n_total)` share) in order.

    Args:
      local_array: [n_local, ...] results for this process's items; trailing dims and dtype
        must agree across processes.
      n_total: the number of items over all processes.

    Returns:
      np.ndarray [n_total, ...] on every process, in input order.

    Raises:
      ValueError: when `local_array` does not have this process's share of rows.
    """
    local_array = np.asarray(local_array)
    count = jax.process_count()
    share = host_slice(n_total)
    if local_array.shape[0] != share.stop - share.start:
        raise ValueError(
            f"gather_in_order: process {jax.process_index()} holds {local_array.shape[0]} rows, "
            f"but its share of {n_total} items is {share.stop - share.start} "
            f"(items {share.start}:{share.stop}); give it exactly the rows of host_slice"
        )
    if count == 1 or n_total == 0:
        return local_array
    # process_allgather needs equal shapes: pad every share to the largest and trim afterwards.
    largest = -(-n_total // count)
    padded = np.zeros((largest,) + local_array.shape[1:], local_array.dtype)
    padded[: local_array.shape[0]] = local_array
    stacked = np.asarray(multihost_utils.process_allgather(padded))  # [count, largest, ...]
    parts = []
    for index in range(count):
        part = host_slice(n_total, index, count)
        parts.append(stacked[index, : part.stop - part.start])
    return np.concatenate(parts)


def put_batch(
    local_batch: Mapping[str, Any],
    mesh: Mesh,
    rules: sharding.Rules,
    *,
    global_rows: int | None = None,
) -> dict[str, Any]:
    """This process's rows of a batch -> global arrays, the batch dimension over the batch axes.

    The one host-to-device placement of g2e: embedding, judging and training batches all go
    through it.

    Args:
      local_batch: {field: numpy array}, possibly nested ({'query': {...}, 'candidate': {...},
        'ids': ...}); each array holds this process's rows, its batch dimension where
        `sharding.batch_dim(field)` says (position_ids [3, B, L]: 1, else 0).
      mesh: the device mesh.
      rules: the logical-axis rule table; its 'batch' rule names the mesh axes the batch is
        split over (`sharding.batch_axes`).
      global_rows: rows of the global batch; default this process's rows times the number of
        processes (every process feeding an equal share).

    Returns:
      The same (nested) structure of jax.Arrays with the global shapes. Process p's rows land
      after those of processes 0..p-1 on a `make_mesh` mesh (process-major along the batch
      axes).

    Raises:
      ValueError: with several processes, when the 'batch' rule names no mesh axis (each
        process's rows would be taken for the whole batch).
    """
    axes = sharding.batch_axes(rules, mesh.axis_names)
    if not axes and jax.process_count() > 1:
        raise ValueError(
            f"put_batch: the 'batch' sharding rule maps to no axis of the mesh {mesh.axis_names}, "
            f"so the batch would be replicated across {jax.process_count()} processes; map "
            "'batch' to the data/fsdp axes in config.sharding_rules"
        )

    def place(field: str, local: Any) -> Any:
        if isinstance(local, Mapping):
            return {name: place(name, value) for name, value in local.items()}
        local = np.asarray(local)
        dim = sharding.batch_dim(field)
        spec = [None] * local.ndim
        spec[dim] = axes or None
        shape = list(local.shape)
        shape[dim] = (
            global_rows if global_rows is not None else (local.shape[dim] * jax.process_count())
        )
        return jax.make_array_from_process_local_data(
            NamedSharding(mesh, PartitionSpec(*spec)), local, tuple(shape)
        )

    return {field: place(field, value) for field, value in local_batch.items()}


def local_row_range(mesh: Mesh, rules: sharding.Rules, global_rows: int) -> slice:
    """The contiguous rows of a `global_rows` batch whose data this process provides."""
    axes = sharding.batch_axes(rules, mesh.axis_names)
    placement = NamedSharding(mesh, PartitionSpec(axes or None))
    indices = placement.addressable_devices_indices_map((global_rows,)).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [global_rows if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))


def local_rows(array: jax.Array, batch_dim: int = 0) -> np.ndarray:
    """This process's rows of a global array sharded over its batch dimension, in order.

    The inverse of `put_batch` for outputs (e.g. embeddings [B, D]): the rows this process
    fed in, without gathering whole arrays from other hosts. An array also sharded over other
    dimensions (e.g. D over tensor) is first resharded to batch-only sharding.
    """
    if array.is_fully_addressable:
        return np.asarray(array)
    if not isinstance(array.sharding, NamedSharding):
        raise ValueError(f"local_rows: needs a NamedSharding, got {array.sharding}")
    spec = list(array.sharding.spec) + [None] * (array.ndim - len(array.sharding.spec))
    if any(entry is not None for i, entry in enumerate(spec) if i != batch_dim):
        spec = [entry if i == batch_dim else None for i, entry in enumerate(spec)]
        target = NamedSharding(array.sharding.mesh, PartitionSpec(*spec))
        array = jax.jit(lambda x: x, out_shardings=target)(array)
    starts = {}
    for shard in array.addressable_shards:
        starts.setdefault(shard.index[batch_dim].start or 0, np.asarray(shard.data))
    return np.concatenate([starts[start] for start in sorted(starts)], axis=batch_dim)
