"""A lock per unit of work (one shard of a stage, one training run) that holds on NFS and Lustre.

The lock is a small file created with ``O_CREAT | O_EXCL`` (atomic on NFSv3+ and Lustre, unlike ``flock``
on many cluster file systems). It names its holder: host, pid, SLURM job id and a random token. While it
is held, a daemon thread touches the file every :data:`HEARTBEAT_S` seconds; the file's mtime is the
heartbeat.

A second process that finds the lock refuses with :class:`LockedError` naming the holder, unless the lock
is *stale*, in which case it is broken and taken:

* the holder ran on this host and its process no longer exists (a killed local run);
* the holder was an earlier start of this same SLURM job (a requeued job has a higher
  ``SLURM_RESTART_COUNT``, and SLURM starts it again only after the earlier start ended);
* its heartbeat is older than :data:`STALE_AFTER_S` (a node that died or lost the file system).

Breaking renames the stale file to a unique name, checks that what was renamed is the lock judged stale
(another process may have broken it and taken a new one in between; that one is put back), and deletes it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from hpcvid.errors import LockedError

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


@dataclass(frozen=True)
class Holder:
    """Who holds a lock, as written in the lock file."""

    host: str
    pid: int
    job: str
    token: str
    since: float
    restart: int = 0

    @classmethod
    def me(cls) -> "Holder":
        job = os.environ.get("SLURM_JOB_ID", "")
        if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        return cls(socket.gethostname(), os.getpid(), job, secrets.token_hex(8), time.time(), restart)

    def describe(self) -> str:
        job = f", SLURM job {self.job}" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}"


def read_holder(path: Path) -> Holder | None:
    try:
        payload = json.loads(path.read_text())
        return Holder(str(payload["host"]), int(payload["pid"]), str(payload.get("job", "")),
                      str(payload["token"]), float(payload.get("since", 0.0)), int(payload.get("restart", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stale_reason(holder: Holder | None, heartbeat_age: float, me: Holder) -> str:
    """Why a lock may be broken ('' when its holder may still be working). Pure: tested on literal values."""
    if holder is None:
        return "" if heartbeat_age < STALE_AFTER_S else "an unreadable lock file with no heartbeat"
    if holder.host == me.host and not _alive(holder.pid):
        return f"{holder.describe()} has ended"
    if holder.job and holder.job == me.job and holder.restart < me.restart:
        return f"it was taken by an earlier start of this SLURM job ({holder.job}, requeued since)"
    if heartbeat_age >= STALE_AFTER_S:
        return f"{holder.describe()} has not renewed it for {heartbeat_age:.0f} s"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class UnitLock:
    """``with UnitLock(path, "extract shard 0001-of-0003"):`` - held for the block, broken only when stale."""

    def __init__(self, path: Path | str, what: str) -> None:
        self.path = Path(path)
        self.what = what
        self.holder = Holder.me()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "UnitLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._start_heartbeat()
                return
            self._break_if_stale()
        holder = read_holder(self.path)
        raise LockedError(f"{self.what} is being worked on by {holder.describe() if holder else 'another process'} "
                          f"(lock {self.path}, renewed {self._age():.0f} s ago): wait for it to finish or cancel "
                          f"it; a holder that died is recognised after {STALE_AFTER_S:.0f} s")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        current = read_holder(self.path)
        if current is not None and current.token == self.holder.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    # ------------------------------------------------------------------------------------------ internals
    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            json.dump(self.holder.__dict__, handle)
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def _age(self) -> float:
        try:
            return max(0.0, time.time() - self.path.stat().st_mtime)
        except FileNotFoundError:
            return 0.0

    def _break_if_stale(self) -> None:
        holder = read_holder(self.path)
        reason = stale_reason(holder, self._age(), self.holder)
        if not reason:
            return
        aside = self.path.with_name(f"{self.path.name}.stale-{self.holder.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return                       # someone else broke it first: try to take it again
        taken = read_holder(aside)
        if holder is not None and (taken is None or taken.token != holder.token):
            with contextlib.suppress(FileExistsError):   # a fresh lock was renamed: give it back
                os.link(aside, self.path)
        else:
            log.warning("broke the lock of %s: %s", self.what, reason)
        with contextlib.suppress(FileNotFoundError):
            aside.unlink()

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.what}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            current = read_holder(self.path)
            if current is None or current.token != self.holder.token:
                log.warning("the lock of %s was taken by another process (%s)", self.what,
                            current.describe() if current else "unreadable")
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)


@contextlib.contextmanager
def held(path: Path | str, what: str) -> Iterator[UnitLock]:
    with UnitLock(path, what) as lock:
        yield lock
