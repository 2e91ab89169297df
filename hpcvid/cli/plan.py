"""``hpcvid plan``: how long each extraction shard will take, the walltime to ask for, the shard count to use.

From the manifest's frame counts and the extraction rates measured with the job's own settings (a short
calibration on a few of the dataset's videos, remembered in WORK/bench.json; ``--rates FILE`` takes rates
measured elsewhere, e.g. on a compute node). ``submit extract`` uses the same prediction when no walltime
is given, and refuses a walltime below it.
"""
from __future__ import annotations

import argparse
import sys

from hpcvid.cli import add_config_arguments, config_from_args, positive_int


def add_cli(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--dataset", metavar="DIR", help="dataset root (indexed first when WORK has no manifest)")
    parser.add_argument("--shards", type=positive_int, metavar="N", help="shard count to plan (default extract.shards)")
    parser.add_argument("--target", metavar="HH:MM:SS",
                        help="walltime to fit: prints the shard count whose largest shard fits it "
                             "(default: the profile's launch.max_walltime, when set)")
    parser.add_argument("--rates", metavar="FILE", help="rates measured elsewhere (a WORK/bench.json of the same settings)")
    parser.add_argument("--recalibrate", action="store_true", help="measure the rates again")


def main(args: argparse.Namespace) -> int:
    from hpcvid.config import walltime_minutes
    from hpcvid.errors import ConfigError
    from hpcvid.fileio import atomic_write_json, read_json
    from hpcvid.launch.planning import Rates, format_walltime, summary_lines
    from hpcvid.stages import extract
    from hpcvid.workfolder import WorkFolder

    config = config_from_args(args, {"extract.shards": args.shards, "dataset.root": args.dataset})
    if args.rates:
        given = Rates.from_dict(read_json(args.rates))
        if given.settings != extract.settings_digest(config):
            raise ConfigError(f"{args.rates} was measured with other extraction settings than this job's: "
                              "measure them with this job file (`hpcvid plan --config JOB --recalibrate`)")
        atomic_write_json(WorkFolder.of(config).rates, given.to_dict())
    target = args.target or config.launch.max_walltime or None
    target_s = walltime_minutes(target) * 60 if target else None
    plan, rates, manifest = extract.make_walltime_plan(config, target_s, recalibrate=args.recalibrate,
                                                       log_to=sys.stdout)
    max_s = walltime_minutes(config.launch.max_walltime) * 60 if config.launch.max_walltime else None
    loads = sorted(plan.loads, key=lambda load: load.seconds)
    shown = plan.loads if len(plan.loads) <= 12 else [loads[0], loads[len(loads) // 2], loads[-1]]
    print(f"{'shard':>12}  {'videos':>7}  {'frames':>10}  predicted")
    for load in shown:
        print(f"{load.index:>4d}-of-{plan.count:04d}  {load.videos:>7d}  {load.frames:>10,d}  "
              f"{format_walltime(load.seconds)}")
    if len(shown) < len(plan.loads):
        print("(the shortest, the median and the longest shard)")
    for line in summary_lines(plan, rates, len(manifest.videos), max_s):
        print(line)
    return 0
