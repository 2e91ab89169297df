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
