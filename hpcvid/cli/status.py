"""``hpcvid status WORK``: one table of every unit of work of a folder, from files plus ONE batched SLURM query.

A row per shard of every unit (``extract``, ``eval/frame``, ``eval/lstm``, ``train/lstm``, ...): the SLURM
state (PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, REQUEUED; the pending reason, e.g.
DependencyNeverSatisfied, in plain words), items done/total (videos; epochs for training), failures,
throughput and ETA. Sources, in order of trust: the shard's record of the unit's current set (written last:
the shard is done), the progress file the stage updates while it runs, and SLURM (sacct + squeue, asked once
for every job). It works from a new shell and after SLURM forgot the jobs: the files are enough to say what
is done. Records of a set that is no longer current (another shard count, other settings) are named under
the table as stale: no stage reads them.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvid.errors import ConfigError, HpcvidError
from hpcvid.launch.progress import read_progress
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder

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
    parser.add_argument("--stage", help="show only this stage's units (e.g. eval), or one unit (eval/lstm)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead of a table")


@dataclass
class ShardRow:
    unit: str
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

    @property
    def stage(self) -> str:
        return Unit.parse(self.unit).stage


@dataclass
class _Task:
    """What is known of one shard before SLURM is asked: its latest job (if any) and where it runs."""

    executor: str
    job_id: str


def _wanted(unit: Unit, stage_filter: str | None) -> bool:
    return not stage_filter or stage_filter in (unit.stage, str(unit))


def shard_rows(work: Path, stage_filter: str | None = None) -> list[ShardRow]:
    """One row per (unit, shard): the latest submission of each shard wins; unsubmitted shards come from files."""
    from hpcvid.launch import executors as launch
    from hpcvid.launch import scheduler

    folder = WorkFolder(work)
    tasks: dict[tuple[Unit, int, int], _Task] = {}
    for submission in launch.read_submissions(work):
        unit = Unit.parse(submission.unit)
        if _wanted(unit, stage_filter):
            for task in submission.tasks:
                tasks[(unit, task["shard"], task["count"])] = _Task(submission.executor, task["job_id"])
    for unit in folder.units():
        if not _wanted(unit, stage_filter):
            continue
        current = folder.current_set(unit) if _sharded(unit) else None
        if current is not None:
            for index in range(current.count):
                tasks.setdefault((unit, index, current.count), _Task("run", "-"))
        for path in _progress_files(folder, unit):
            progress = read_progress(path) or {}
            if "index" in progress and "count" in progress and (current is None or current.count == progress["count"]):
                tasks.setdefault((unit, int(progress["index"]), int(progress["count"])), _Task("run", "-"))
    slurm_ids = [t.job_id for t in tasks.values() if t.executor == "slurm"]
    states: dict[str, Any] = {}
    if slurm_ids:
        try:
            states = scheduler.query_jobs(slurm_ids)
        except HpcvidError as error:
            print(f"status: SLURM could not be asked ({error}); states come from the files only")
    now = time.time()
    return [_row(folder, unit, ShardSpec(index, count), task, states, now)
            for (unit, index, count), task in sorted(tasks.items(), key=lambda kv: (_order(kv[0][0]), kv[0]))]


def _sharded(unit: Unit) -> bool:
    from hpcvid.stages import STAGES

    return unit.stage not in STAGES or STAGES[unit.stage].sharded


def _progress_files(folder: WorkFolder, unit: Unit) -> list[Path]:
    base = folder.progress_file(unit, ShardSpec(0, 1)).parent
    return sorted(base.glob("shard-*.json")) if base.is_dir() else []


def _order(unit: Unit) -> tuple[int, str]:
    from hpcvid.stages import PIPELINE_ORDER

    return (PIPELINE_ORDER.index(unit.stage) if unit.stage in PIPELINE_ORDER else len(PIPELINE_ORDER), unit.run)


def _count(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, (list, tuple, dict)):
        return len(value)
    return None


def _done_record(folder: WorkFolder, unit: Unit, spec: ShardSpec) -> dict[str, Any] | None:
    """The shard's record when it belongs to the unit's current set (or, unsharded, when it exists)."""
    path = folder.record_file(unit, spec)
    if _sharded(unit) and not folder.is_current(unit, spec):
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _row(folder: WorkFolder, unit: Unit, spec: ShardSpec, task: _Task, states: dict, now: float) -> ShardRow:
    row = ShardRow(str(unit), spec.name if _sharded(unit) else "-", task.job_id, "UNKNOWN")
    known = states.get(task.job_id)
    if known is not None:
        row.state, row.reason, row.requeues = known.state, known.reason, known.requeues
    record = _done_record(folder, unit, spec)
    progress = read_progress(folder.progress_file(unit, spec))
    if record is not None:
        videos = _count(record.get("videos", record.get("n_videos")))
        row.failed = _count(record.get("failed", [])) or 0
        row.done = row.total = (videos or 0) + (row.failed if isinstance(record.get("videos"), list) else 0)
        if progress is not None and progress.get("total") is not None and unit.stage == "train":
            row.done, row.total = progress.get("done"), progress.get("total")
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
        row.state = _state_from_files(task, progress)
    if row.requeues and row.state == "PENDING":
        row.state = "REQUEUED"
    return row


def _state_from_files(task: _Task, progress: dict[str, Any] | None) -> str:
    """No record and nothing from SLURM: a local process (its PID) tells RUNNING or STOPPED."""
    import socket

    if task.executor == "slurm":
        return "UNKNOWN"
    if progress is None:
        return "NOT RUN" if task.executor == "run" else _local_state(task.job_id)
    if progress.get("host") not in (None, socket.gethostname()):
        return "UNKNOWN"
    return _local_state(progress.get("pid") if task.executor == "run" else task.job_id)


def _local_state(job_id: Any) -> str:
    """A local process (submitit's local job id is the PID): RUNNING while the process lives."""
    import os

    try:
        os.kill(int(str(job_id).split("_")[0]), 0)
        return "RUNNING"
    except (ValueError, TypeError, ProcessLookupError):
        return "STOPPED"  # ended without writing its record: failed or killed (see its log)
    except PermissionError:
        return "RUNNING"


def stale_notes(work: Path, stage_filter: str | None = None) -> list[str]:
    """One line per unit whose folder holds records of a set that is not current (never read)."""
    folder = WorkFolder(work)
    notes = []
    for unit in folder.units():
        if not _wanted(unit, stage_filter) or not _sharded(unit):
            continue
        stale = folder.stale_records(unit)
        if stale:
            current = folder.current_set(unit)
            what = f"the current set has {current.count} shard(s)" if current else "no set is planned"
            notes.append(f"stale: {len(stale)} record(s) of another {unit} set in {folder.unit_dir(unit)} "
                         f"(e.g. {stale[0].name}; {what}): never read; delete them when you no longer need them")
    return notes


def _fmt_eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def format_table(rows: list[ShardRow]) -> str:
    header = ("UNIT", "SHARD", "JOB", "STATE", "DONE", "FAILED", "RATE/min", "ETA", "NOTE")
    lines = [header]
    for r in rows:
        done = f"{r.done}/{r.total}" if r.done is not None and r.total is not None else "-"
        note = REASONS.get(r.reason, r.reason) if r.reason else ""
        if r.reason and r.reason in REASONS:
            note = f"{r.reason}: {note}"
        if r.requeues:
            note = (note + "; " if note else "") + f"requeued {r.requeues}x"
        lines.append((r.unit, r.shard, r.job_id, r.state, done, "-" if r.failed is None else str(r.failed),
                      "-" if r.rate_per_min is None else f"{r.rate_per_min:.1f}", _fmt_eta(r.eta_s), note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def summary(rows: list[ShardRow]) -> str:
    done_shards = sum(1 for r in rows if r.state == "COMPLETED")
    counted = [r for r in rows if r.stage != "train"]
    videos = sum(r.done or 0 for r in counted)
    total = sum(r.total or 0 for r in counted)
    failed = sum(r.failed or 0 for r in counted)
    stuck = [r for r in rows if r.reason == "DependencyNeverSatisfied"]
    text = f"{done_shards}/{len(rows)} jobs completed; videos {videos}/{total}; failed videos {failed}"
    if stuck:
        text += f"\n{len(stuck)} job(s) will never start (DependencyNeverSatisfied): an earlier stage failed"
    return text


def main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    folder = WorkFolder(work)
    if not folder.jobs_dir.is_dir() and not folder.units():
        raise ConfigError(f"{work}: nothing was submitted or run in this work folder (no jobs/, no shards, no "
                          "progress): run `hpcvid submit STAGE --work WORK` or `hpcvid run STAGE` first")
    rows = shard_rows(work, args.stage)
    notes = stale_notes(work, args.stage)
    if args.json:
        print(json.dumps([{**r.__dict__, "stage": r.stage} for r in rows], indent=2))
        return 0
    print(format_table(rows))
    print(summary(rows))
    for note in notes:
        print(note)
    return 0
