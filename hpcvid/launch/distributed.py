"""Where this process sits in a distributed job: rank, world size, local rank, master address and port.

One function, :func:`detect`, reads whichever launcher started us: torchrun (``RANK``/``WORLD_SIZE``),
submitit (its ``TorchDistributedEnvironment``), SLURM's srun (``SLURM_PROCID``/``SLURM_NTASKS``), or Open MPI
(``OMPI_COMM_WORLD_*``); with none of them it is a single process. The port is derived
from the SLURM job id so that concurrent jobs on the same nodes do not collide. The master address is the
first node of the allocation; a node name that does not resolve (the fake nodes of slurm/local-cluster.sh,
or sites whose node names are not in DNS) is replaced by the NodeAddr that ``scontrol show node`` knows.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # which launcher it came from: torchrun, submitit, slurm, mpi, single

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def export(self) -> None:
        """Set the variables torch.distributed's ``env://`` init reads."""
        os.environ.update({
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size), "LOCAL_RANK": str(self.local_rank),
            "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port),
        })


def port_for_job(job_id: str | int) -> int:
    """A port in [20000, 40000) derived from the job id (array jobs: '1234_5' uses both numbers)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def _first_host(nodelist: str) -> str:
    """First host name of a SLURM node list ('n[1-3],m7' -> 'n1'), without calling scontrol."""
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",")[0].split("-")[0]
        return prefix + first
    return head


def resolve_node(name: str) -> str:
    """An address for a SLURM node name: the name when it resolves, else scontrol's NodeAddr, else the name."""
    try:
        socket.getaddrinfo(name, None)
        return name
    except OSError:
        pass
    try:
        out = subprocess.run(["scontrol", "show", "node", name, "-o"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return name
    for field in out.stdout.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    return name


def _from_submitit(env: Mapping[str, str]) -> DistEnv | None:
    """Inside a submitit job: its TorchDistributedEnvironment (rank, world, local rank, first host)."""
    try:
        from submitit.helpers import TorchDistributedEnvironment

        dist = TorchDistributedEnvironment()
    except Exception:  # noqa: BLE001 - not a usable submitit job: fall back to the plain variables
        return None
    master = env.get("MASTER_ADDR") or resolve_node(dist.master_addr)
    return DistEnv(dist.rank, dist.world_size, dist.local_rank, master,
                   int(env.get("MASTER_PORT") or port_for_job(env.get("SLURM_JOB_ID", "0"))), "submitit")


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The distributed environment of this process (single process when no launcher is found).

    ``environ`` is for tests; without it the real environment is read, and inside a submitit job
    submitit's own TorchDistributedEnvironment is asked.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or variables we exported ourselves
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if environ is None and env.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_PROCID" in env:
        found = _from_submitit(env)
        if found is not None:
            return found
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun (also under mpi=pmix)
        job = env.get("SLURM_JOB_ID", "0")
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        master = env.get("MASTER_ADDR") or (resolve_node(_first_host(nodelist)) if environ is None
                                            else _first_host(nodelist))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       master, int(env.get("MASTER_PORT") or port_for_job(job)), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)), "mpi")
    return DistEnv()
