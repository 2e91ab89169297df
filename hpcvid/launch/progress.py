"""Per-shard progress that a login node can read while the shard runs elsewhere.

A shard stage calls :func:`write_progress` every few items; ``hpcvid status`` reads the files with
:func:`read_progress`. Each file is one small JSON document replaced atomically, so a reader never sees
a half-written one. Layout: ``WORK/.progress/<stage>/shard-<IIII-of-NNNN>.json``.
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

PROGRESS_DIR = ".progress"


def progress_path(work: Path | str, stage: str, spec: ShardSpec) -> Path:
    return Path(work) / PROGRESS_DIR / stage / f"shard-{spec.name}.json"


def write_progress(work: Path | str, stage: str, spec: ShardSpec, *, done: int, total: int,
                   failed: int = 0, started: float | None = None) -> None:
    """Record that ``done`` of ``total`` items of this shard are finished (``failed`` of them failed)."""
    path = progress_path(work, stage, spec)
    previous = read_progress(path) or {}
    now = time.time()
    atomic_write_json(path, {
        "stage": stage, "index": spec.index, "count": spec.count, "done": int(done), "total": int(total),
        "failed": int(failed), "started": started or previous.get("started") or now, "updated": now,
        "host": socket.gethostname(), "pid": os.getpid(),
    })


def read_progress(path: Path | str) -> dict[str, Any] | None:
    """The progress document, or None when there is none (or it cannot be read)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
