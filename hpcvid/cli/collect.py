"""``hpcvid collect WORK``: the reducer, from the login node (or across MPI ranks with ``--mpi``).

The same function as the pipeline's ``reduce`` stage (:func:`hpcvid.stages.reduce.collect`): every current
prediction shard of WORK's eval runs, counted exactly once, into results/NAME.
"""
from __future__ import annotations

import argparse


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.stages.reduce import add_arguments

    parser.add_argument("work", metavar="WORK", help="work folder with manifest.json and eval/<run>/pred-*.h5")
    add_arguments(parser)
    parser.add_argument("--mpi", action="store_true",
                        help="reduce across the ranks of mpirun/srun with MPI (automatic with more than one rank)")


def main(args: argparse.Namespace) -> int:
    from hpcvid.config import parse_fusion, resolve_config
    from hpcvid.stages.reduce import collect, in_mpi_job, overrides
    from hpcvid.stages.report import format_table, read_summary

    use_mpi = bool(args.mpi or in_mpi_job())
    report = resolve_config(overrides=overrides(args)).report      # the [report] checks and defaults
    out = collect(args.work, args.out, runs=args.runs, allow_partial=args.allow_partial, use_mpi=use_mpi,
                  fusion=parse_fusion(report.fusion), explain=report.explain)
    if out is None:
        return 0
    summary = read_summary(out)
    print(format_table(summary))
    print(f"report: {out / 'report.md'}")
    return 3 if summary.get("partial") else 0
