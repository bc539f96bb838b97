"""Joining the processes of a multi-host run.

`jaxrm train` runs the same command on every host. On a Cloud TPU pod slice, and under SLURM or
Open MPI, JAX finds the other processes itself (TPU metadata, the scheduler's environment).
Anywhere else, name the coordinator (process 0's address and a free port), the number of
processes and this one's id, as flags or as environment variables:

    jaxrm train CONFIG --coordinator 10.0.0.1:8476 --num-processes 2 --process-id 0
    JAX_COORDINATOR_ADDRESS=10.0.0.1:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 jaxrm train CONFIG

Every process must see the same files at the same paths (the data, and the run directory that
all of them write checkpoints into).
"""

import argparse
import os

import jax
import numpy as np

from jaxrm.errors import UserError

ENVIRONMENT = {
    "coordinator": "JAX_COORDINATOR_ADDRESS",
    "num_processes": "JAX_NUM_PROCESSES",
    "process_id": "JAX_PROCESS_ID",
}


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "multi-host", "not needed on TPU pod slices, SLURM or Open MPI, where JAX finds its peers"
    )
    group.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        help=f"process 0's address and a free port (env {ENVIRONMENT['coordinator']})",
    )
    group.add_argument(
        "--num-processes",
        type=int,
        metavar="N",
        help=f"processes in the run (env {ENVIRONMENT['num_processes']})",
    )
    group.add_argument(
        "--process-id",
        type=int,
        metavar="I",
        help=f"this process, 0 to N-1 (env {ENVIRONMENT['process_id']})",
    )


def process_0_says(answer: bool) -> bool:
    """Process 0's `answer`, on every process (each passes its own; a collective when there are
    several), so that all of them take the same way on."""
    if jax.process_count() == 1:
        return answer
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(answer)))


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """Joins the other processes of the run, if there are any; call before JAX touches a device.

    Explicit settings (arguments, else environment) win; without any, a cluster JAX can detect
    (TPU pod slice, SLURM, Open MPI) is joined, and a lone process runs alone.
    """
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    settings = {
        name: value if value is not None else os.environ.get(ENVIRONMENT[name])
        for name, value in given.items()
    }
    if all(value is None for value in settings.values()):
        if _cluster_detected():
            _join()
        return
    missing = [
        f"--{name.replace('_', '-')} (or {ENVIRONMENT[name]})"
        for name, value in settings.items()
        if value is None
    ]
    if missing:
        raise UserError(f"multi-host: also give {' and '.join(missing)}")
    count = _integer(settings["num_processes"], "num_processes")
    index = _integer(settings["process_id"], "process_id")
    if count < 1 or not 0 <= index < count:
        raise UserError(
            f"multi-host: process id {index} is not in 0..{count - 1} (--num-processes {count})"
        )
    _join(str(settings["coordinator"]), count, index)


def _join(
    coordinator: str | None = None, count: int | None = None, index: int | None = None
) -> None:
    try:
        jax.distributed.initialize(coordinator, count, index)
    except (RuntimeError, ValueError) as e:
        where = f"{coordinator} as process {index} of {count}" if coordinator else "the cluster"
        raise UserError(f"multi-host: could not join {where}: {str(e).splitlines()[0]}") from None


def _cluster_detected() -> bool:
    # JAX's public API can join a cluster but not say whether there is one; its detectors are
    # private (jax is pinned). Opt-in detectors (mpi4py) only run when asked for.
    from jax._src import clusters

    return any(
        not cluster.opt_in_only_method and cluster.is_env_present()
        for cluster in clusters.ClusterEnv._cluster_types
    )


def _integer(value: str | int, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"multi-host: {ENVIRONMENT[name]}={value!r} is not an integer") from None
