"""``hpcvid cancel WORK``: cancel every queued or running job submitted from a work folder (the whole chain).

Reads the submission records (hpcvid.launch.executors), asks SLURM once which of their jobs are still alive
(hpcvid.launch.scheduler) and cancels those with one ``scancel``. Finished shards and their records stay.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from hpcvid.errors import ConfigError


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", metavar="WORK", help="work folder holding jobs/ (the submission records)")
    parser.add_argument("--stage", help="cancel only this stage's jobs")


def main(args: argparse.Namespace) -> int:
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    work = Path(args.work)
    if not (work / "jobs").is_dir():
        raise ConfigError(f"{work}/jobs does not exist: nothing was submitted from this work folder")
    ids = [task["job_id"] for sub in launch.read_submissions(work)
           if sub.executor == "slurm" and (not args.stage or sub.stage == args.stage) for task in sub.tasks]
    states = scheduler.query_jobs(ids) if ids else {}
    alive = sorted({job_id for job_id in ids if job_id in states and not states[job_id].finished})
    if not alive:
        print("cancel: no queued or running jobs")
        return 0
    scheduler.cancel_jobs(alive)
    print(f"cancel: cancelled {len(alive)} job(s): {' '.join(alive)}")
    return 0
