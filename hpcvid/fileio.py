"""Writing files so that a kill at any instant never leaves a half-written file that looks complete.

Everything is written to a temporary name in the same folder, flushed, fsynced and renamed over the
final name; a reader sees either the old file, the new one, or none. A finished data file is described
by its record (:func:`write_record`), written after it: "the record exists" means "the file is done".
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

from hpcvid.errors import machine_fault


def temporary_path_for(final: Path) -> Path:
    """A unique temporary name beside ``final`` (same file system, so the rename is atomic)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(fd)
    # mkstemp creates 0600; shards and records live in a project folder a whole group reads.
    os.chmod(name, 0o666 & ~_current_umask())
    return Path(name)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_file(temporary: Path, final: Path) -> None:
    """fsync ``temporary`` and atomically rename it to ``final``."""
    with open(temporary, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    _fsync_dir(Path(final).parent)


@contextlib.contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path to write to; on success it replaces ``final``, on error it is removed.

    A full disk, a read-only folder, a missing permission or an I/O error becomes a ResourceError naming
    the folder and the fix, whoever writes (h5py, torch, json).
    """
    final = Path(final)
    try:
        temporary = temporary_path_for(final)
    except OSError as error:
        raise (machine_fault(error, final.parent, f"writing {final.name}") or error) from error
    try:
        yield temporary
        commit_file(temporary, final)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        fault = machine_fault(error, final.parent, f"writing {final.name}")
        if fault is not None:
            raise fault from error
        raise


def atomic_write_bytes(final: Path | str, data: bytes) -> None:
    with atomic_path(final) as temporary:
        temporary.write_bytes(data)


def atomic_write_text(final: Path | str, text: str) -> None:
    atomic_write_bytes(final, text.encode("utf-8"))


def atomic_write_json(final: Path | str, payload: Any) -> None:
    """Write JSON atomically (sorted keys, indented, trailing newline: diff-friendly records)."""
    atomic_write_text(final, json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")


def write_record(path: Path | str, fields: Mapping[str, Any], *, kind: str, schema_version: int,
                   describes: Path | str) -> dict[str, Any]:
    """Write the record of the finished file ``describes``, atomically: ``fields`` plus ``schema_version``,
    ``kind``, ``file`` (its name) and ``sha256`` (of its bytes now). Returns the record as read back, i.e.
    exactly what a later reader (another process, a rerun) will see."""
    record = {**fields, "schema_version": schema_version, "kind": kind, "file": Path(describes).name,
              "sha256": sha256_file(describes)}
    atomic_write_json(path, record)
    return read_json(path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def read_json(path: Path | str) -> Any:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def remove_stale_partials(folder: Path | str) -> list[Path]:
    """Delete temporary files left by killed writers (``.<name>.*.partial``); return what was removed."""
    removed = []
    for partial in Path(folder).glob(".*.partial"):
        with contextlib.suppress(FileNotFoundError):
            partial.unlink()
            removed.append(partial)
    return removed


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
