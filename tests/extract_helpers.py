"""Helpers for the extract/merge/store tests: tiny datasets, manifests written directly, configs.

The manifests are written with hpcvid.storage.manifest (the foundation's contract), so these tests exercise the
extract stage alone, whatever the indexer does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from hpcvid.config import Config, SynthConfig, resolve_config
from hpcvid.storage.manifest import Manifest, VideoEntry, write_manifest

VIDEO_SUFFIXES = (".avi", ".mp4", ".mkv", ".mov", ".webm")


def make_synthetic(root: Path, *, classes: int = 2, per_class: int = 3, test_per_class: int = 1,
                   frames: int = 8, size: str = "32x32") -> Path:
    """A tiny synthetic dataset (hpcvid.stages.synth) in UCF-101's layout."""
    from hpcvid.stages.synth import generate

    return Path(generate(root, SynthConfig(classes=classes, per_class=per_class, test_per_class=test_per_class,
                                           frames=frames, size=size)))


def listed_test_ids(root: Path) -> set[str]:
    """Ids listed in testlist01.txt (UCF-101 layout), or none."""
    listing = root / "testlist01.txt"
    if not listing.is_file():
        return set()
    return {line.split()[0].rsplit(".", 1)[0] for line in listing.read_text().splitlines() if line.strip()}


def write_folder_manifest(root: Path, work: Path, *, files: Iterable[Path] | None = None) -> Manifest:
    """Manifest of every video below ``root`` (class = first folder, or 'misc'); split from testlist01."""
    root = Path(root)
    tests = listed_test_ids(root)
    paths = sorted(files) if files is not None else sorted(
        p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    classes = sorted({p.relative_to(root).parts[0] if len(p.relative_to(root).parts) > 1 else "misc"
                      for p in paths})
    entries = []
    for path in paths:
        rel = path.relative_to(root)
        class_name = rel.parts[0] if len(rel.parts) > 1 else "misc"
        video_id = rel.with_suffix("").as_posix()
        stat = os.stat(path)
        entries.append(VideoEntry(id=video_id, path=rel.as_posix(), label=classes.index(class_name),
                                  class_name=class_name, split="test" if video_id in tests else "train",
                                  size=stat.st_size, mtime=stat.st_mtime))
    manifest = Manifest(classes=tuple(classes), videos=tuple(entries), dataset={"root": str(root)})
    write_manifest(manifest, work)
    return manifest


def extract_config(work: Path, **extract: Any) -> Config:
    """A config for tiny tests: 32 px frames, Farneback flow, no CNN unless asked, in one process unless
    ``workers`` says otherwise (so that a test can patch what runs per video)."""
    settings = {"work": str(work), "extract.size": 32, "extract.backbone": "none", "extract.flow": "farneback",
                "extract.workers": 0}
    settings.update({f"extract.{k}": v for k, v in extract.items()})
    return resolve_config(None, None, settings)
