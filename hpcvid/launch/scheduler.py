"""What SLURM says about our jobs: one batched ``sacct`` and one ``squeue`` call, and pure parsers.

``hpcvid status`` asks once for every job of every submission record (never once per shard: a login node
and its scheduler are shared). ``sacct`` remembers finished jobs long after ``squeue`` forgets them;
``squeue`` gives the pending reason (``DependencyNeverSatisfied``) that ``sacct`` lacks. All commands go
through :func:`hpcvid.launch.external.run_command`, the one place a unit test may replace. The parsers take the
literal text of ``--parsable2`` / ``-o`` output, so they are tested on text, not on a cluster.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterable

from hpcvid.launch.external import run_command
from hpcvid.errors import CommandError, SchedulerError

SACCT_FIELDS = ("JobID", "State", "ExitCode", "Start", "End", "Elapsed", "NodeList")
SQUEUE_FORMAT = "%i|%T|%r"
# The states status reports, in SLURM's words. Others (e.g. NODE_FAIL, OUT_OF_MEMORY) are shown as they come.
STATES = ("PENDING", "RUNNING", "COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "REQUEUED")
FINISHED = frozenset({"COMPLETED", "FAILED", "TIMEOUT", "CANCELLED", "NODE_FAIL", "OUT_OF_MEMORY",
                      "BOOT_FAIL", "DEADLINE", "PREEMPTED"})


@dataclass(frozen=True)
class JobState:
    """One job (or array task) as SLURM sees it now."""

    job_id: str
    state: str
    exit_code: str = ""
    start: str = ""
    end: str = ""
    elapsed: str = ""
    nodes: str = ""
    reason: str = ""
    requeues: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


# ------------------------------------------------------------------------------------------- parsers
_ARRAY = re.compile(r"^(\d+)_\[([^\]]+)\]$")


def expand_job_id(job_id: str) -> list[str]:
    """'12_[0-2,5%2]' -> ['12_0', '12_1', '12_2', '12_5']; plain ids are returned as they are."""
    match = _ARRAY.match(job_id.strip())
    if not match:
        return [job_id.strip()]
    base, spec = match.groups()
    spec = spec.split("%", 1)[0]
    ids: list[str] = []
    for part in spec.split(","):
        if "-" in part:
            low, high = part.split("-", 1)
            ids.extend(f"{base}_{i}" for i in range(int(low), int(high) + 1))
        elif part:
            ids.append(f"{base}_{part}")
    return ids


def normalise_state(text: str) -> str:
    """'CANCELLED by 0' -> 'CANCELLED'; 'RUNNING' stays."""
    return text.strip().split(" ", 1)[0].upper() if text.strip() else "UNKNOWN"


def parse_sacct(text: str) -> dict[str, JobState]:
    """Lines of ``sacct -n -P -D -X -o JobID,State,ExitCode,Start,End,Elapsed,NodeList``.

    With ``-D`` a requeued job appears once per run, oldest first: the last line is its state now and the
    earlier REQUEUED lines are counted in ``requeues``. Step lines (``12.batch``) are ignored.
    """
    jobs: dict[str, JobState] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split("|")
        if len(fields) < len(SACCT_FIELDS):
            raise SchedulerError(f"unexpected sacct line {line!r}: expected {len(SACCT_FIELDS)} '|'-separated fields")
        job_id, state, exit_code, start, end, elapsed, nodes = fields[: len(SACCT_FIELDS)]
        if "." in job_id:
            continue
        state = normalise_state(state)
        for one in expand_job_id(job_id):
            before = jobs.get(one)
            requeues = (before.requeues if before else 0) + (1 if before and before.state == "REQUEUED" else 0)
            jobs[one] = JobState(one, state, exit_code, start, end, elapsed, nodes, requeues=requeues)
    return jobs


def parse_squeue(text: str) -> dict[str, tuple[str, str]]:
    """Lines of ``squeue -h -r -o '%i|%T|%r'`` -> job id -> (state, reason)."""
    queued: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        parts = line.split("|")
        if len(parts) < 3:
            raise SchedulerError(f"unexpected squeue line {line!r}: expected 'JOBID|STATE|REASON'")
        for one in expand_job_id(parts[0]):
            queued[one] = (normalise_state(parts[1]), parts[2].strip())
    return queued


def merge_views(accounted: dict[str, JobState], queued: dict[str, tuple[str, str]]) -> dict[str, JobState]:
    """sacct's view, with squeue's live state and pending reason where squeue still knows the job."""
    merged = dict(accounted)
    for job_id, (state, reason) in queued.items():
        base = merged.get(job_id, JobState(job_id, state))
        merged[job_id] = replace(base, state=state, reason="" if reason in ("None", "(null)") else reason)
    return merged


# ------------------------------------------------------------------------------------------- queries
def base_ids(job_ids: Iterable[str]) -> list[str]:
    """'12_3' -> '12': what sacct/squeue/scancel are asked about, once per array."""
    return sorted({str(j).split("_", 1)[0] for j in job_ids if str(j).strip()}, key=lambda s: (len(s), s))


def query_jobs(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The state of every given job in ONE sacct call and ONE squeue call.

    Raises SchedulerError when neither command can be run (no SLURM client here). A job that both have
    forgotten is simply absent; the caller falls back to the files the job wrote.
    """
    ids = base_ids(job_ids)
    if not ids:
        return {}
    accounted: dict[str, JobState] = {}
    queued: dict[str, tuple[str, str]] = {}
    errors = []
    try:
        out = run_command(["sacct", "-n", "-P", "-D", "-X", "-o", ",".join(SACCT_FIELDS), "-j", ",".join(ids)],
                          timeout=60)
        accounted = parse_sacct(out.stdout)
    except CommandError as error:
        errors.append(str(error))
    try:
        out = run_command(["squeue", "-h", "-r", "-o", SQUEUE_FORMAT, "-j", ",".join(ids)], timeout=60, check=False)
        if out.returncode == 0:
            queued = parse_squeue(out.stdout)
        elif "Invalid job id" not in out.stderr:  # squeue fails when it forgot every job asked about
            errors.append(out.stderr.strip())
    except CommandError as error:
        errors.append(str(error))
    if len(errors) == 2:
        raise SchedulerError("cannot ask SLURM about the jobs (sacct and squeue failed): " + "; ".join(errors))
    return merge_views(accounted, queued)


def cancel_jobs(job_ids: Iterable[str]) -> list[str]:
    """scancel the given jobs (arrays as a whole when given '12_3'-style ids of all tasks); return the ids."""
    ids = sorted({str(j) for j in job_ids}, key=lambda s: (len(s), s))
    if ids:
        run_command(["scancel", *ids], timeout=60)
    return ids
