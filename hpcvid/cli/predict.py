"""``hpcvid predict``: classify videos of one's own with a trained run, on this machine, and print the table.

The ``predict`` stage (:mod:`hpcvid.stages.predict`) run here and now: by default in a temporary folder that
is removed afterwards (``--work DIR`` keeps the extraction there, and a rerun resumes from it), with the table
written to ``--out`` (``predictions.csv`` in the current folder by default). For a folder of thousands of
videos, queue the same stage on the cluster: ``hpcvid submit predict ... --shards N``.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path


def add_cli(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import add_config_arguments, positive_int
    from hpcvid.stages import STAGES

    add_config_arguments(parser)
    STAGES["predict"].load().add_arguments(parser)
    parser.add_argument("--force", action="store_true", help="extract and score again what --work already holds")
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                        help="with --shards N: run N shards at once in separate processes")
    parser.set_defaults(out_default="predictions.csv")


def main(args: argparse.Namespace) -> int:
    from hpcvid.cli import config_from_args
    from hpcvid.config import write_resolved
    from hpcvid.launch.executors import run_shards_locally, run_stage_shard
    from hpcvid.stages import STAGES

    stage = STAGES["predict"]
    module = stage.load()
    changes = module.overrides(args)
    changes["predict.out"] = changes["predict.out"] or str(Path(args.out_default).absolute())
    with tempfile.TemporaryDirectory(prefix="hpcvid-predict-") as temporary:
        if not args.work:
            changes["work"] = temporary
        config = config_from_args(args, changes)
        specs = module.plan(config, None, bool(args.force))
        write_resolved(config, argv=sys.argv)
        if args.jobs > 1 and len(specs) > 1:
            records = run_shards_locally(config, stage, specs, args.jobs)
        else:
            records = [run_stage_shard(stage, config, spec) for spec in specs]
        return int(module.report(config, records))
