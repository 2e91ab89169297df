"""The one place that runs external commands (ffmpeg, sbatch, sacct, scancel, ...).

Argument lists only, never a shell; a failure raises :class:`CommandError` with the command, its exit
code and its stderr. Tests that fake a scheduler replace this function, and nothing else.
"""
from __future__ import annotations

import logging
import subprocess
from typing import Sequence

from hpcvid.errors import CommandError

log = logging.getLogger(__name__)


def run_command(
    command: Sequence[str], *, timeout: float | None = None, check: bool = True, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``command`` and return its completed process (text mode); raise CommandError when it fails."""
    argv = [str(part) for part in command]
    log.debug("running %s", argv)
    try:
        completed = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, input=input_text, check=False
        )
    except FileNotFoundError as exc:
        raise CommandError(argv, 127, stderr=f"{argv[0]}: not found on PATH ({exc.strerror})") from exc
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, 124, stderr=f"timed out after {timeout} s") from exc
    if check and completed.returncode != 0:
        raise CommandError(argv, completed.returncode, completed.stdout, completed.stderr)
    return completed
