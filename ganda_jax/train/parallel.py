"""Device mesh, shardings and multi-process start-up (data parallel, no pmap).

The batch is split along the ``data`` mesh axis; the train state is replicated.
``jax.jit`` with these shardings makes XLA insert the gradient all-reduce, so
the same program runs on 1 CPU, 8 GPUs or a multi-host TPU slice.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"

_DISTRIBUTED_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    (or run on a TPU pod / SLURM, where JAX detects them itself and
    ``GANDA_DISTRIBUTED=1`` asks for initialisation).
    """
    if jax.distributed.is_initialized():
        return
    wanted = os.environ.get("GANDA_DISTRIBUTED") == "1" or (
        all(k in os.environ for k in _DISTRIBUTED_ENV) and int(os.environ["JAX_NUM_PROCESSES"]) > 1
    )
    if not wanted:
        return
    if all(k in os.environ for k in _DISTRIBUTED_ENV):
        # JAX reads only JAX_COORDINATOR_ADDRESS from the environment; the process count
        # and id would otherwise go to cluster auto-detection, which finds nothing on a
        # plain machine ("Number of processes must be defined").
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D ``data`` mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices but only {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def stacked_data_sharding(mesh: Mesh) -> NamedSharding:
    """Batches stacked along a new leading (steps) axis, each sharded like ``data_sharding``."""
    return NamedSharding(mesh, P(None, DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch_size(global_batch: int, mesh: Mesh) -> None:
    n = mesh.devices.size
    if global_batch % n:
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {n} devices of the mesh; "
            f"use a multiple of {n}"
        )
    if global_batch % jax.process_count():
        raise ValueError(
            f"batch_size {global_batch} is not divisible by the {jax.process_count()} processes"
        )
