"""The manifest (``WORK/manifest.json``): the contract between indexing and every later stage.

Written by :mod:`hpcvid.stages.index`; read by extraction, training, evaluation and the reducer. Labels index
``classes``; ``split`` is 'train', 'test' or 'unused'. A video that could not be probed stays in the
manifest with ``frames = None`` and its ``probe_error``, so extraction lists it as failed and the final
report still counts it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_write_json, read_json

MANIFEST_NAME = "manifest.json"
MANIFEST_SCHEMA_VERSION = 1
SPLITS = ("train", "test", "unused")


@dataclass(frozen=True)
class VideoEntry:
    """One video of the dataset. ``id`` is stable: the path below the dataset root, without extension."""

    id: str
    path: str
    label: int
    class_name: str
    split: str
    size: int
    mtime: float
    fps: float | None = None
    frames: int | None = None
    width: int | None = None
    height: int | None = None
    probe_error: str | None = None


@dataclass(frozen=True)
class Manifest:
    classes: tuple[str, ...]
    videos: tuple[VideoEntry, ...]
    dataset: dict[str, Any]
    warnings: tuple[str, ...] = ()
    schema_version: int = MANIFEST_SCHEMA_VERSION

    def by_split(self, split: str) -> list[VideoEntry]:
        return [v for v in self.videos if v.split == split]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": self.schema_version,
            "dataset": self.dataset,
            "classes": list(self.classes),
            "videos": [dataclasses.asdict(v) for v in self.videos],
            "warnings": list(self.warnings),
        }


def manifest_path(work: Path | str) -> Path:
    return Path(work) / MANIFEST_NAME


def write_manifest(manifest: Manifest, work: Path | str) -> Path:
    path = manifest_path(work)
    atomic_write_json(path, manifest.to_dict())
    return path


def load_manifest(work: Path | str) -> Manifest:
    """Read ``WORK/manifest.json``; a missing or newer-schema file is a StoreError that says what to run."""
    path = manifest_path(work)
    if not path.is_file():
        raise StoreError(f"{path} does not exist: run `hpcvid index --config JOB --work {work}` first")
    payload = read_json(path)
    version = payload.get("schema_version")
    if version != MANIFEST_SCHEMA_VERSION:
        raise StoreError(f"{path} has schema_version {version}, this hpcvid reads {MANIFEST_SCHEMA_VERSION}: "
                         "re-run `hpcvid index`")
    return Manifest(
        classes=tuple(payload["classes"]),
        videos=tuple(VideoEntry(**v) for v in payload["videos"]),
        dataset=payload.get("dataset", {}),
        warnings=tuple(payload.get("warnings", ())),
    )
