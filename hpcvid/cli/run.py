"""``hpcvid run STAGE``: run a stage on this machine and wait.

The shards run in this process one after the other, or with ``--jobs N`` in N local processes through
submitit's local executor (the code path of ``hpcvid submit``). Either way each shard is the stage's own
``run_shard`` under the shard's lock (:func:`hpcvid.launch.executors.run_stage_shard`).
"""
from __future__ import annotations

import argparse
import sys

from hpcvid.cli import add_config_arguments, config_from_args, positive_int
from hpcvid.config import write_resolved
from hpcvid.stages import STAGES, Stage


def add_stage_arguments(parser: argparse.ArgumentParser, stage: Stage) -> None:
    """The flags of one stage under any verb: the shared ones, the stage's own, --force and --shard."""
    add_config_arguments(parser)
    stage.load().add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="redo shards whose record exists")
    if stage.sharded:
        parser.add_argument("--shard", type=int, metavar="I", help="run only shard I (0-based); default: all")


def add_cli(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, stage in STAGES.items():
        sub = stages.add_parser(name, help=stage.help, description=stage.help)
        add_stage_arguments(sub, stage)
        if stage.sharded:
            sub.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                             help="run N shards at once in separate processes (submitit's local executor)")


def main(args: argparse.Namespace) -> int:
    from hpcvid.launch.executors import run_shards_locally, run_stage_shard

    stage = STAGES[args.stage]
    module = stage.load()
    config = config_from_args(args, module.overrides(args))
    specs = module.plan(config, getattr(args, "shard", None), bool(args.force))
    write_resolved(config, argv=sys.argv)
    if getattr(args, "jobs", 1) > 1 and len(specs) > 1:
        records = run_shards_locally(config, stage, specs, args.jobs)
    else:
        records = [run_stage_shard(stage, config, spec) for spec in specs]
    return int(module.report(config, records))
