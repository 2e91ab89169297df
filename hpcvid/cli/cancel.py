"""``hpcvid cancel WORK``: cancel every queued or running job submitted from a work folder (the whole chain).

Reads the submission records (hpcvid.launch.executors), asks SLURM once which of their jobs are still alive
(hpcvid.launch.scheduler) and cancels those with one ``scancel``. Finished shards and their records stay.
"""
from __future__ import annotations

import argparse

from hpcvid.errors import ConfigError
from hpcvid.workfolder import WorkFolder


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", metavar="WORK", help="work folder holding jobs/ (the submission records)")
    parser.add_argument("--stage", help="cancel only this stage's jobs (e.g. eval), or one unit's (eval/lstm)")


def main(args: argparse.Namespace) -> int:
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    work = WorkFolder(args.work)
    if not work.jobs_dir.is_dir():
        raise ConfigError(f"{work.jobs_dir} does not exist: nothing was submitted from this work folder")
    ids = [task["job_id"] for sub in launch.read_submissions(work.root)
           if sub.executor == "slurm" and (not args.stage or args.stage in (sub.stage, sub.unit))
           for task in sub.tasks]
    states = scheduler.query_jobs(ids) if ids else {}
    alive = sorted({job_id for job_id in ids if job_id in states and not states[job_id].finished})
    if not alive:
        print("cancel: no queued or running jobs")
        return 0
    scheduler.cancel_jobs(alive)
    print(f"cancel: cancelled {len(alive)} job(s): {' '.join(alive)}")
    return 0
