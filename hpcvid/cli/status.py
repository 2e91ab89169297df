"""``hpcvid status WORK``: one table of every unit of work of a folder, from files plus ONE batched SLURM query.

A row per shard of every unit (``extract``, ``eval/frame``, ``eval/lstm``, ``train/lstm``, ...): the SLURM
state (PENDING, RUNNING, COMPLETED, FAILED, TIMEOUT, CANCELLED, REQUEUED; the pending reason, e.g.
DependencyNeverSatisfied, in plain words), items done/total (videos; epochs for training, with the best
validation accuracy so far), failures, throughput and ETA. A job that waits for a failed one says which unit
failed, through any number of waiting jobs in between, and the summary gives the command that picks up
from there. ``--watch N`` prints the table again every N seconds (one batched query each time) until every
job has ended. Sources, in order of trust: the shard's record of the unit's current set (written last:
the shard is done), the progress file the stage updates while it runs, and SLURM (sacct + squeue, asked once
for every job). It works from a new shell and after SLURM forgot the jobs: the files are enough to say what
is done. Records of a set that is no longer current (another shard count, other settings) are named under
the table as stale: no stage reads them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvid.cli import positive_int
from hpcvid.errors import ConfigError, HpcvidError
from hpcvid.launch.progress import read_progress
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder

REASONS = {
    "DependencyNeverSatisfied": "waits for a job that failed: it will never start (submit again to pick up)",
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
    parser.add_argument("--watch", type=positive_int, nargs="?", const=30, metavar="SECONDS",
                        help="print the table again every SECONDS (default 30) until every job has ended")


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
    best_val_acc: float | None = None
    stopped_early: bool = False
    blocked_by: str = ""     # the failed unit (and job) this pending job waits for, directly or not

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
    waits = Dependencies.of(launch.read_submissions(work))
    states: dict[str, Any] = {}
    if slurm_ids:
        try:
            states = scheduler.query_jobs([*slurm_ids, *waits.upstream_of(slurm_ids)])
        except HpcvidError as error:
            print(f"status: SLURM could not be asked ({error}); states come from the files only")
    now = time.time()
    rows = [_row(folder, unit, ShardSpec(index, count), task, states, now)
            for (unit, index, count), task in sorted(tasks.items(), key=lambda kv: (_order(kv[0][0]), kv[0]))]
    for row in rows:
        if row.state == "PENDING":
            row.blocked_by = waits.failed_upstream(row.job_id, states) or ""
    return rows


_FAILED = frozenset({"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                     "PREEMPTED"})


@dataclass
class Dependencies:
    """Which unit every submitted job belongs to and which jobs it waits for (from the submission records)."""

    unit_of: dict[str, str]
    after: dict[str, list[str]]

    @classmethod
    def of(cls, submissions: list[Any]) -> "Dependencies":
        unit_of: dict[str, str] = {}
        after: dict[str, list[str]] = {}
        for submission in submissions:
            upstream = [j for j in submission.dependency.partition(":")[2].split(":") if j]
            for job_id in submission.job_ids:
                for key in (str(job_id), str(job_id).split("_", 1)[0]):
                    unit_of[key] = submission.unit
                after[str(job_id)] = upstream
        return cls(unit_of, after)

    def upstream_of(self, job_ids: list[str]) -> list[str]:
        """Every job the given ones wait for, directly or not (asked about in the same query)."""
        found: list[str] = []
        todo = [j for job in job_ids for j in self.after.get(job, [])]
        while todo:
            job = todo.pop()
            if job not in found:
                found.append(job)
                todo += [j for task in self._tasks(job) for j in self.after.get(task, [])]
        return found

    def _tasks(self, job: str) -> list[str]:
        """A dependency names a job, an array task or a whole array (its base id)."""
        return [key for key in self.after if key == job or key.split("_", 1)[0] == job]

    def failed_upstream(self, job_id: str, states: dict[str, Any], seen: frozenset[str] = frozenset()) -> str | None:
        """'train/flow (FAILED, job 57)' when ``job_id`` waits, directly or through waiting jobs, for a failed one."""
        for dependency in self.after.get(job_id, []):
            tasks = [k for k in states if k == dependency or k.split("_", 1)[0] == dependency] or [dependency]
            for task in tasks:
                state = states.get(task)
                if state is not None and state.state in _FAILED:
                    return f"{self.unit_of.get(dependency, '?')} ({state.state}, job {task})"
                if state is not None and state.state == "PENDING" and task not in seen:
                    deeper = self.failed_upstream(task, states, seen | {job_id})
                    if deeper:
                        return deeper
        return None


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
        done_here = done - (progress.get("done_at_start") or 0)   # a resumed run counts what this start did
        if done_here > 0 and elapsed > 0:
            row.rate_per_min = done_here / elapsed * 60
            if record is None and row.total is not None and row.state in ("RUNNING", "UNKNOWN"):
                row.eta_s = (row.total - done) / (done_here / elapsed)
        row.best_val_acc = progress.get("best_val_acc")
        row.stopped_early = bool(progress.get("stopped_early"))
    if unit.stage == "train":
        row.failed = None    # epochs, not videos: nothing fails one at a time
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


def _note(row: ShardRow) -> str:
    parts = []
    if row.blocked_by:
        parts.append(f"never starts: waits for {row.blocked_by}")
    elif row.reason:
        parts.append(f"{row.reason}: {REASONS[row.reason]}" if row.reason in REASONS else row.reason)
    if row.stage == "train" and row.total is not None:
        best = "-" if row.best_val_acc is None else f"{row.best_val_acc:.3f}"
        parts.append(f"epochs; best val acc {best}" + ("; stopped early" if row.stopped_early else ""))
    if row.requeues:
        parts.append(f"requeued {row.requeues}x")
    return "; ".join(parts)


def format_table(rows: list[ShardRow]) -> str:
    header = ("UNIT", "SHARD", "JOB", "STATE", "DONE", "FAILED", "RATE/min", "ETA", "NOTE")
    lines = [header]
    for r in rows:
        done = f"{r.done}/{r.total}" if r.done is not None and r.total is not None else "-"
        lines.append((r.unit, r.shard, r.job_id, r.state, done, "-" if r.failed is None else str(r.failed),
                      "-" if r.rate_per_min is None else f"{r.rate_per_min:.1f}", _fmt_eta(r.eta_s), _note(r)))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def summary(rows: list[ShardRow], resubmit: str = "") -> str:
    done_shards = sum(1 for r in rows if r.state == "COMPLETED")
    counted = [r for r in rows if r.stage != "train"]
    videos = sum(r.done or 0 for r in counted)
    total = sum(r.total or 0 for r in counted)
    failed = sum(r.failed or 0 for r in counted)
    stuck = [r for r in rows if r.blocked_by or r.reason == "DependencyNeverSatisfied"]
    text = f"{done_shards}/{len(rows)} jobs completed; videos {videos}/{total}; failed videos {failed}"
    if stuck:
        units = ", ".join(dict.fromkeys(r.unit for r in stuck))
        causes = ", ".join(dict.fromkeys(r.blocked_by for r in stuck if r.blocked_by)) or "a failed job"
        text += (f"\n{len(stuck)} job(s) will never start: {units} wait for {causes}. "
                 "Fix the cause (its log is in WORK/jobs/logs) and submit again to pick up from there: finished "
                 "work is kept, the failed job and what waits for it are queued again")
        if resubmit:
            text += f":\n  {resubmit}"
    return text


def ended(rows: list[ShardRow]) -> bool:
    """No job that may still change: each one finished, or waits for a failed one (it never starts)."""
    from hpcvid.launch.pipeline import ACTIVE

    return not any(r.state in ACTIVE and not r.blocked_by and r.reason != "DependencyNeverSatisfied" for r in rows)


def _last_command(work: Path) -> str:
    """The command line of the newest submission (what picks up after a failure when typed again)."""
    import shlex

    from hpcvid.launch.executors import read_submissions

    submissions = [s for s in read_submissions(work) if s.argv]
    if not submissions:
        return ""
    return shlex.join(["hpcvid", *submissions[-1].argv[1:]])


def main(args: argparse.Namespace) -> int:
    work = Path(args.work)
    folder = WorkFolder(work)
    if not folder.jobs_dir.is_dir() and not folder.units():
        raise ConfigError(f"{work}: nothing was submitted or run in this work folder (no jobs/, no shards, no "
                          "progress): run `hpcvid submit STAGE --work WORK` or `hpcvid run STAGE` first")
    try:
        while True:
            rows = shard_rows(work, args.stage)
            if args.json:
                print(json.dumps([{**r.__dict__, "stage": r.stage} for r in rows], indent=2))
            else:
                _print_table(work, rows, args)
            if not args.watch or ended(rows):
                break
            time.sleep(args.watch)
    except KeyboardInterrupt:   # the usual way to leave --watch early
        print()
    return 0


def _print_table(work: Path, rows: list[ShardRow], args: argparse.Namespace) -> None:
    if args.watch and sys.stdout.isatty():
        print("\033[H\033[J", end="")     # a refreshed screen rather than a scrolling log
    print(format_table(rows))
    print(summary(rows, _last_command(work)))
    for note in stale_notes(work, args.stage):
        print(note)
    if args.watch:
        if ended(rows):
            print("watch: every job has ended")
        else:
            print(f"watch: {time.strftime('%H:%M:%S')}, again in {args.watch} s (Ctrl-C stops)", flush=True)
