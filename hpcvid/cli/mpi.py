"""``hpcvid mpi STAGE``: run a shard stage inside one MPI allocation (``mpirun -n N`` or ``srun --mpi=pmix``).

Rank 0 plans the shards (the same ``plan`` as every executor) and broadcasts them; rank r runs shards
r, r + N, r + 2N, ... (round robin) with the stage's plain ``run_shard``; rank 0 gathers the records and
prints the stage's report. The output files are the same as those of the array path: only *where* the
shards run differs. mpi4py is imported here, inside the verb, never by ``hpcvid --help``.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any

from hpcvid.cli import config_from_args
from hpcvid.config import write_resolved
from hpcvid.errors import ConfigError, HpcvidError, PartialFailure


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli.run import add_stage_arguments
    from hpcvid.stages import STAGES

    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        if stage.sharded:
            sub = stages.add_parser(name, help=stage.help, description=stage.help)
            add_stage_arguments(sub, stage)


def _world():
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ConfigError("hpcvid mpi needs mpi4py: pip install 'hpcvid[mpi]' (and an MPI such as Open MPI)") from error
    return MPI.COMM_WORLD


def shards_for_rank(specs: list, rank: int, size: int) -> list:
    """Round robin: rank r takes shards r, r + size, ..."""
    return specs[rank::size]


def main(args: argparse.Namespace) -> int:
    from hpcvid.launch.executors import run_stage_shard
    from hpcvid.stages import STAGES

    comm = _world()
    rank, size = comm.Get_rank(), comm.Get_size()
    stage = STAGES[args.stage]
    module = stage.load()
    config = config_from_args(args, module.overrides(args))
    specs: Any = None
    planning_error = ""
    if rank == 0:
        try:
            specs = list(module.plan(config, getattr(args, "shard", None), bool(args.force)))
            write_resolved(config, argv=sys.argv)
        except HpcvidError as error:
            planning_error = str(error)
    specs, planning_error = comm.bcast((specs, planning_error), root=0)
    if planning_error:
        raise ConfigError(planning_error) if rank == 0 else SystemExit(2)
    results: list[tuple[int, dict | None, str]] = []
    for spec in shards_for_rank(specs, rank, size):
        try:
            results.append((spec.index, run_stage_shard(stage, config, spec), ""))
        except HpcvidError as error:   # one line, gathered and reported by rank 0
            results.append((spec.index, None, f"rank {rank}: shard {spec.name}: {error}"))
        except Exception as error:  # noqa: BLE001 - gathered and reported by rank 0, never lost
            results.append((spec.index, None, f"rank {rank}: shard {spec.name}: {error}\n"
                                              f"{traceback.format_exc(limit=3)}"))
    gathered = comm.gather(results, root=0)
    if rank != 0:
        return 0
    flat = sorted((item for part in gathered for item in part), key=lambda item: item[0])
    failures = [message for _, record, message in flat if record is None]
    code = int(module.report(config, [record for _, record, _ in flat if record is not None]))
    print(f"mpi: {len(flat)} shard(s) on {size} rank(s); {len(failures)} failed")
    if failures:
        raise PartialFailure("shards failed under MPI:\n" + "\n".join(failures))
    return code
