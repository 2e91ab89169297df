"""``hpcvid status WORK``: one table of every submitted shard, from files plus ONE batched SLURM query.

Per shard: the SLURM state (PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, REQUEUED; the pending
reason, e.g. DependencyNeverSatisfied, in plain words), videos done/total, failures, throughput and ETA.
Sources, in order of trust: the shard's record (written last: the shard is done), the progress file the
stage updates while it runs (hpcvid.launch.progress), and SLURM (sacct + squeue, asked once for every job).
It works from a new shell and after SLURM forgot the jobs: the files are enough to say what is done.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvid.errors import ConfigError, HpcvidError
from hpcvid.launch.progress import PROGRESS_DIR, progress_path, read_progress
from hpcvid.launch.sharding import ShardSpec

REASONS = {
    "DependencyNeverSatisfied": "waits for a job that failed: it will never start (hpcvid cancel WORK, then resubmit)",
    "Dependency": "waits for the previous stage",
    "Resources": "waits for free nodes",
    "Priority": "waits for its turn",
    "BeginTime": "waits for its requeue delay",
    "JobArrayTaskLimit": "waits: array parallelism limit",
}


def add_cli(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("work", metavar="WORK", help="work folder holding jobs/ (the submission records)")
    parser.add_argument("--stage", help="show only this stage")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


@dataclass
class ShardRow:
    stage: str
    shard: str
    job_id: str
    state: str
    reason: str = ""
    done: int | None = None
    total: int | None = None
    failed: int | None = None
    rate_per_min: float | None = None
    eta_s: float | None = None
    requeues: int = 0


def record_path(work: Path, stage: str, spec: ShardSpec) -> Path:
    """Where a stage writes a shard's record: the stage's ``record_path`` if it has one, else the default."""
    from hpcvid.cli.run import STAGES

    if stage in STAGES:
        import importlib

        try:
            module = importlib.import_module(STAGES[stage])
            if hasattr(module, "record_path"):
                from hpcvid.config import load_resolved

                return Path(module.record_path(load_resolved(work), spec))
        except HpcvidError:
            pass
    return work / stage / f"shard-{spec.name}.json"


def _count(value: Any) -> int | None:
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    return None


def shard_rows(work: Path, stage_filter: str | None = None) -> list[ShardRow]:
    """One row per (stage, shard): the latest submission of each shard wins."""
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    submissions = [s for s in launch.read_submissions(work) if not stage_filter or s.stage == stage_filter]
    latest: dict[tuple[str, int, int], tuple[Any, dict]] = {}
    for submission in submissions:
        for task in submission.tasks:
            latest[(submission.stage, task["shard"], task["count"])] = (submission, task)
    slurm_ids = [task["job_id"] for sub, task in latest.values() if sub.executor == "slurm"]
    states: dict[str, scheduler.JobState] = {}
    query_error = ""
    if slurm_ids:
        try:
            states = scheduler.query_jobs(slurm_ids)
        except HpcvidError as error:
            query_error = str(error)
    now = time.time()
    latest.update(_unsubmitted_shards(work, set(latest), stage_filter))
    rows = []
    for (stage, index, count), (submission, task) in sorted(latest.items(), key=lambda kv: (
            launch_order(kv[0][0]), kv[0][1])):
        rows.append(_row(work, stage, index, count, submission, task, states, now))
    if query_error:
        print(f"status: SLURM could not be asked ({query_error}); states come from the files only")
    return rows


def _unsubmitted_shards(work: Path, submitted: set[tuple[str, int, int]],
                        stage_filter: str | None) -> dict[tuple[str, int, int], tuple[Any, dict]]:
    """Shards run with `hpcvid run` (no submission record): their progress files say where they are.

    They get job id '-' and the local executor's liveness check on the PID that wrote the progress.
    """
    from types import SimpleNamespace

    found: dict[tuple[str, int, int], tuple[Any, dict]] = {}
    for path in sorted((work / PROGRESS_DIR).glob("*/shard-*.json")):
        progress = read_progress(path)
        if not progress or (stage_filter and progress.get("stage") != stage_filter):
            continue
        key = (str(progress["stage"]), int(progress["index"]), int(progress["count"]))
        if key not in submitted:
            found[key] = (SimpleNamespace(executor="run"), {"job_id": "-", "pid": progress.get("pid")})
    return found


def launch_order(stage: str) -> int:
    from hpcvid.cli.submit import STAGE_ORDER

    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def _row(work: Path, stage: str, index: int, count: int, submission: Any, task: dict, states: dict,
         now: float) -> ShardRow:
    spec = ShardSpec(index, count)
    name = task.get("name") or spec.name
    row = ShardRow(stage, name, task["job_id"], "UNKNOWN")
    known = states.get(task["job_id"])
    if known is not None:
        row.state, row.reason, row.requeues = known.state, known.reason, known.requeues
    record_file = record_path(work, stage, spec)
    record = None
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
        except ValueError:
            record = None
    progress = read_progress(progress_path(work, stage, spec))
    if record is not None:
        videos = _count(record.get("videos", record.get("n_videos")))
        row.failed = _count(record.get("failed", [])) or 0
        row.done = row.total = (videos or 0) + (row.failed if isinstance(record.get("videos"), list) else 0)
        if known is None:
            row.state = "COMPLETED"
        elif row.state != "COMPLETED":
            row.reason = row.reason or "its record exists: the shard's work is done"
    elif progress is not None:
        row.done, row.total, row.failed = progress.get("done"), progress.get("total"), progress.get("failed")
    if progress is not None:
        elapsed = float(progress.get("updated", now)) - float(progress.get("started", now))
        done = progress.get("done") or 0
        if done and elapsed > 0:
            row.rate_per_min = done / elapsed * 60
            if record is None and row.total is not None and row.state in ("RUNNING", "UNKNOWN"):
                row.eta_s = (row.total - done) / (done / elapsed)
    if known is None and record is None:
        row.state = "UNKNOWN" if submission.executor == "slurm" else _local_state(task.get("pid") or task["job_id"])
    if row.requeues and row.state == "PENDING":
        row.state = "REQUEUED"
    return row


def _local_state(job_id: str) -> str:
    """A job of submitit's local executor (its id is the PID): RUNNING while the process lives."""
    import os

    try:
        os.kill(int(str(job_id).split("_")[0]), 0)
        return "RUNNING"
    except (ValueError, ProcessLookupError):
        return "STOPPED"  # ended without writing its record: failed or killed (see its log)
    except PermissionError:
        return "RUNNING"


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_table(rows: list[ShardRow]) -> str:
    header = ("STAGE", "SHARD", "JOB", "STATE", "VIDEOS", "FAILED", "RATE/min", "ETA", "NOTE")
    lines = [header]
    for r in rows:
        videos = f"{r.done}/{r.total}" if r.done is not None and r.total is not None else "-"
        note = REASONS.get(r.reason, r.reason) if r.reason else ""
        if r.reason and r.reason in REASONS:
            note = f"{r.reason}: {note}"
        if r.requeues:
            note = (note + "; " if note else "") + f"requeued {r.requeues}x"
        lines.append((r.stage, r.shard, r.job_id, r.state, videos, "-" if r.failed is None else str(r.failed),
                      "-" if r.rate_per_min is None else f"{r.rate_per_min:.1f}", _fmt_eta(r.eta_s), note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def summary(rows: list[ShardRow]) -> str:
    done_shards = sum(1 for r in rows if r.state == "COMPLETED")
    videos = sum(r.done or 0 for r in rows)
    total = sum(r.total or 0 for r in rows)
    failed = sum(r.failed or 0 for r in rows)
    stuck = [r for r in rows if r.reason == "DependencyNeverSatisfied"]
    text = f"{done_shards}/{len(rows)} jobs completed; videos {videos}/{total}; failed videos {failed}"
    if stuck:
        text += f"\n{len(stuck)} job(s) will never start (DependencyNeverSatisfied): an earlier stage failed"
    return text


def main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    if not (work / "jobs").is_dir() and not (work / PROGRESS_DIR).is_dir():
        raise ConfigError(f"{work} has neither jobs/ nor {PROGRESS_DIR}/: nothing was submitted or run in this "
                          "work folder (run `hpcvid submit STAGE --work WORK` or `hpcvid run STAGE` first)")
    rows = shard_rows(work, args.stage)
    if args.json:
        print(json.dumps([r.__dict__ for r in rows], indent=2))
        return 0
    print(format_table(rows))
    print(summary(rows))
    return 0
