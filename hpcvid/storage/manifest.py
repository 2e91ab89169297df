"""The manifest (``WORK/manifest.json``): the contract between indexing and every later stage.

Written by :mod:`hpcvid.stages.index`; read by extraction, training, evaluation and the reducer. Labels index
``classes``; ``split`` is 'train', 'test' or 'unused'. A video that could not be probed stays in the
manifest with ``frames = None`` and its ``probe_error``, so extraction lists it as failed and the final
report still counts it.

``path`` is relative to the dataset root (``dataset.root``, absolute: the dataset lives outside WORK), so a
dataset moved elsewhere needs only ``--dataset NEW_ROOT``, not a new index; extraction checks each video's
size against ``size``. :func:`content_digest` is what later stages compare to know that their inputs were
made from this manifest: the classes and videos, not where the dataset lies.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_write_json, read_json
from hpcvid.workfolder import WorkFolder

MANIFEST_SCHEMA_VERSION = 2
SPLITS = ("train", "test", "unused")


@dataclass(frozen=True)
class VideoEntry:
    """One video of the dataset. ``id`` is stable: the path below the dataset root, without extension;
    ``path`` is that path with its extension ('/'-separated, relative to the dataset root)."""

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
    root: int = 0                      # 0: dataset.root; i: the i-th of dataset.extra_roots
    source_class: str | None = None    # the dataset's own class, when the task relabels or selects classes


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


def content_digest(manifest: Manifest) -> str:
    """A short digest of what the manifest says about the data (classes; each video's id, label, split, size
    and frame count), independent of where the dataset lies."""
    videos = sorted((v.id, v.label, v.split, v.size, v.frames) for v in manifest.videos)
    text = json.dumps({"classes": list(manifest.classes), "videos": videos})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def write_manifest(manifest: Manifest, work: Path | str) -> Path:
    path = WorkFolder(work).manifest
    atomic_write_json(path, manifest.to_dict())
    return path


def load_manifest(work: Path | str) -> Manifest:
    """Read ``WORK/manifest.json``; a missing or other-schema file is a StoreError that says what to run."""
    path = WorkFolder(work).manifest
    if not path.is_file():
        raise StoreError(f"{path} does not exist: run `hpcvid index --config JOB --work {work}` first")
    try:
        payload = read_json(path)
    except (OSError, ValueError) as error:
        raise StoreError(f"{path} cannot be read ({error}): re-run `hpcvid index`") from error
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
