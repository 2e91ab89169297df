"""Where this process sits in a distributed job: rank, world size, local rank, master address and port.

One function, :func:`detect`, reads whichever launcher started us: torchrun (``RANK``/``WORLD_SIZE``),
submitit or SLURM (``SLURM_PROCID``/``SLURM_NTASKS``), or Open MPI (``OMPI_COMM_WORLD_*``); with none of
them it is a single process. The port is derived from the SLURM job id so that concurrent jobs on the
same nodes do not collide.
"""
from __future__ import annotations

import os
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


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """The distributed environment of this process (single process when no launcher is found)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or variables we exported ourselves
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:  # srun / submitit on SLURM
        job = env.get("SLURM_JOB_ID", "0")
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR", _first_host(nodelist)), port_for_job(job))
    if "OMPI_COMM_WORLD_RANK" in env:  # mpirun
        return DistEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                       int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                       int(env.get("MASTER_PORT", 29500)))
    return DistEnv()
