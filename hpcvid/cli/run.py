"""The stage registry and ``hpcvid run STAGE``.

A stage module provides:

* ``HELP: str`` - one line for ``--help``;
* ``add_arguments(parser)`` - its own flags (the shared --config/--profile/--work are added here);
* ``overrides(args) -> dict`` - its flags as dotted config keys (``{"extract.shards": args.shards}``);
* ``plan(config, args) -> list[ShardSpec]`` - the shards to run now (done ones skipped unless --force);
* ``run_shard(config, spec) -> dict`` - THE plain function that does the work and returns its record.
  It is the same function whichever executor (in-process, submitit local/slurm/debug, MPI) calls it;
* ``report(config, records) -> int`` - print a summary; exit code 0, or 3 when some items failed.

A stage may instead provide ``run_local(config, args) -> int`` when it is not a list of independent
shards (the distributed trainer). The executors in :mod:`hpcvid.launch.executors` only decide *where* shards run.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

from hpcvid.cli import add_config_arguments, config_from_args
from hpcvid.config import write_resolved

# stage -> module. Only stages that are built are listed.
STAGES: dict[str, str] = {
    "extract": "hpcvid.stages.extract",
    "merge": "hpcvid.stages.merge",
    "eval": "hpcvid.stages.evaluate",
    "train": "hpcvid.stages.train",
    "features": "hpcvid.stages.features",
}


def load_stage(name: str) -> ModuleType:
    return importlib.import_module(STAGES[name])


def add_cli(parser: argparse.ArgumentParser) -> None:
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name in STAGES:
        module = load_stage(name)
        sub = stages.add_parser(name, help=module.HELP, description=module.HELP)
        add_config_arguments(sub)
        module.add_arguments(sub)
        if hasattr(module, "run_shard"):
            sub.add_argument("--jobs", type=int, default=1, metavar="N",
                             help="run N shards at once in separate processes (submitit's local executor)")


def main(args: argparse.Namespace) -> int:
    module = load_stage(args.stage)
    config = config_from_args(args, module.overrides(args))
    write_resolved(config, argv=sys.argv)
    if hasattr(module, "run_local"):
        return int(module.run_local(config, args))
    specs = module.plan(config, args)
    if getattr(args, "jobs", 1) > 1 and len(specs) > 1:
        from hpcvid.launch.executors import run_shards_locally

        records = run_shards_locally(config, module.__name__, specs, args.jobs)
    else:
        records = [module.run_shard(config, spec) for spec in specs]
    return int(module.report(config, records))
