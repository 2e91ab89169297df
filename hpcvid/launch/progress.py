"""Per-shard progress that a login node can read while the shard runs elsewhere.

A stage calls :func:`write_progress` every few items; ``hpcvid status`` reads the files with
:func:`read_progress`. Each file is one small JSON document replaced atomically, so a reader never sees
a half-written one. Where it lives is the work folder's business (``WORK/.progress/<unit>/shard-*.json``).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from hpcvid.fileio import atomic_write_json
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder


def write_progress(work: Path | str, unit: Unit, spec: ShardSpec, *, done: int, total: int,
                   failed: int = 0, started: float | None = None, **extra: Any) -> None:
    """Record that ``done`` of ``total`` items of this shard are finished (``failed`` of them failed).

    ``extra`` carries what a stage adds for status (the trainer: best validation accuracy).
    """
    path = WorkFolder(work).progress_file(unit, spec)
    previous = read_progress(path) or {}
    now = time.time()
    atomic_write_json(path, {
        "unit": str(unit), "stage": unit.stage, "index": spec.index, "count": spec.count, "done": int(done),
        "total": int(total), "failed": int(failed), "started": started or previous.get("started") or now,
        "updated": now, "host": socket.gethostname(), "pid": os.getpid(), **extra,
    })


def read_progress(path: Path | str) -> dict[str, Any] | None:
    """The progress document, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
