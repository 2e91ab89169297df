"""The project's error types.

Every error a user can cause or fix is one of these; the CLI prints ``str(error)`` on one line and exits
with the error's ``exit_code``. Messages name the file, the key or the command, and say how to fix it.
"""
from __future__ import annotations


class HpcvidError(Exception):
    """Base class: an error with a message meant for the user."""

    exit_code = 2


class ConfigError(HpcvidError):
    """A job file, cluster profile or command-line option is invalid."""


class DatasetError(HpcvidError):
    """A dataset folder or split file is missing or inconsistent."""


class VideoError(HpcvidError):
    """One video cannot be decoded or processed; the rest of the work goes on."""


class StoreError(HpcvidError):
    """An HDF5 shard, merged file or prediction file is missing, incomplete or of the wrong schema."""


class CheckpointError(HpcvidError):
    """A checkpoint or weights file is missing, corrupt or incompatible."""


class CommandError(HpcvidError):
    """An external command (ffmpeg, sbatch, sacct, ...) failed."""

    def __init__(self, command: list[str], returncode: int, stdout: str = "", stderr: str = "") -> None:
        self.command = list(command)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        last = (stderr.strip().splitlines() or stdout.strip().splitlines() or [""])[-1]
        super().__init__(f"command {' '.join(self.command)!r} exited with {returncode}: {last}")


class SchedulerError(HpcvidError):
    """Submitting to or querying the scheduler (SLURM) failed."""


class PartialFailure(HpcvidError):
    """The work finished, but some items (videos, shards) failed; they are listed in the named record."""

    exit_code = 3


class LockedError(HpcvidError):
    """Another live process is working on the same unit of work (its lock names the holder)."""


class ResourceError(HpcvidError):
    """A fault of the machine, not of the data: a full disk or quota, a read-only folder, no permission to
    write, an I/O error, no memory. The work stops at once and nothing is recorded as a bad video."""


# errno -> (what happened, what to do), for OSErrors that are the machine's fault
_MACHINE_FAULTS = {
    28: ("no space is left", "free space (`df -h {folder}`) or use a larger file system (--work), then rerun"),
    122: ("the disk quota is exceeded", "free space in your quota (`quota -s`), then rerun"),
    30: ("the file system is read-only", "make it writable, or give another work folder (--work)"),
    13: ("there is no permission to write", "fix the permissions of {folder}, or give another work folder (--work)"),
    1: ("the operation is not permitted", "fix the permissions of {folder}, or give another work folder (--work)"),
    5: ("the storage reported an I/O error", "check the file system (ask the site's admins), then rerun"),
}


def machine_fault(error: BaseException, folder: object, doing: str = "writing") -> ResourceError | None:
    """The ResourceError for an error that is the machine's fault (None for anything else).

    h5py reports a failed write as an OSError, or when it fails while flushing a file as a RuntimeError,
    whose message carries the errno ("errno = 28") rather than in ``errno``; every form is recognised.
    """
    if isinstance(error, MemoryError):
        return ResourceError(f"out of memory while {doing} ({folder}): give the job more memory (launch.mem) or "
                             "use smaller shards, then rerun")
    if not isinstance(error, (OSError, RuntimeError)):
        return None
    number = error.errno if isinstance(error, OSError) else None
    if number is None:
        import re

        found = re.search(r"errno = (\d+)", str(error))
        number = int(found.group(1)) if found else None
    if number not in _MACHINE_FAULTS:
        return None
    what, fix = _MACHINE_FAULTS[number]
    where = getattr(error, "filename", None) or folder
    return ResourceError(f"{where}: {what} while {doing}: {fix.format(folder=folder)}")
