"""Fabricated work folders for the reducer and report tests: a manifest and prediction shards.

Shared by tests/test_reduce.py, tests/test_report.py and tests/test_mpi_reduce.py. The scores
are random but seeded, so every test sees the same numbers.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from hpcvid.storage.manifest import Manifest, VideoEntry, write_manifest
from hpcvid.launch.sharding import all_shards, select
from hpcvid.storage.predictions import PredictionShard, write_prediction_shard
from hpcvid.workfolder import Unit, WorkFolder


def make_manifest(work: Path, n_classes: int = 6, test_per_class: int = 5, train_per_class: int = 2,
                  class_names: list[str] | None = None) -> Manifest:
    classes = tuple(class_names or [f"Class{i:03d}" for i in range(n_classes)])
    videos = []
    for label, name in enumerate(classes):
        for j in range(test_per_class + train_per_class):
            split = "test" if j < test_per_class else "train"
            vid = f"{name}/v_{name}_g{j:02d}_c01"
            videos.append(VideoEntry(id=vid, path=f"{vid}.avi", label=label, class_name=name, split=split,
                                     size=1000, mtime=0.0, fps=25.0, frames=32, width=64, height=64))
    manifest = Manifest(classes=classes, videos=tuple(videos), dataset={"format": "ucf101", "root": "/data"})
    write_manifest(manifest, work)
    return manifest


def fabricate_scores(manifest: Manifest, strategies: dict[str, float], seed: int = 0) -> dict[str, np.ndarray]:
    """strategy -> (N_test, C) scores whose accuracy is roughly the given number."""
    rng = np.random.default_rng(seed)
    tests = manifest.by_split("test")
    labels = np.array([v.label for v in tests])
    scores = {}
    for name, skill in strategies.items():
        values = rng.normal(size=(len(tests), len(manifest.classes))).astype(np.float32)
        boost = rng.random(len(tests)) < skill
        values[np.arange(len(tests))[boost], labels[boost]] += 10.0
        scores[name] = values
    return scores


def write_run(work: Path, manifest: Manifest, run: str, model: str, strategies: dict[str, float], shards: int,
              default: str | None = None, seed: int = 0, skip: tuple[int, ...] = ()) -> list[Path]:
    """Write ``shards`` prediction shards of one run (except the indices in ``skip``); return the .h5 paths.

    The shards form the run's current eval set, as the eval stage's plan would declare it.
    """
    tests = manifest.by_split("test")
    folder, unit = WorkFolder(work), Unit("eval", run)
    shard_set = folder.declare_set(unit, shards, {"fabricated": seed})
    index_of = {v.id: i for i, v in enumerate(tests)}
    scores = fabricate_scores(manifest, strategies, seed)
    paths = []
    for spec in all_shards(shards):
        if spec.index in skip:
            continue
        chosen = select(tests, spec, key=lambda v: v.id)
        rows = [index_of[v.id] for v in chosen]
        shard = PredictionShard(
            model=model, run=run, shard=spec, classes=manifest.classes, video_ids=[v.id for v in chosen],
            labels=np.array([v.label for v in chosen]), scores={s: a[rows] for s, a in scores.items()},
            default_strategy=default or next(iter(strategies)), checkpoint=f"runs/{run}/checkpoint.pt",
            checkpoint_sha256="abc123", config={"train": {"model": model}}, code_version="test",
        )
        write_shard(work, shard, shard_set.id)
        paths.append(folder.shard_file(unit, spec))
    return paths


def write_single_shard(work: Path, manifest: Manifest, run: str, model: str, strategies: dict[str, float],
                       seed: int = 0) -> None:
    """All test videos in one shard, with the same scores write_run(..., seed) gives (the concatenation)."""
    write_run(work, manifest, run, model, strategies, shards=1, seed=seed)


def write_shard(work: Path, shard: PredictionShard, set_id: str) -> dict:
    """Write one prediction shard where the eval stage puts it, as a member of the set ``set_id``."""
    folder, unit = WorkFolder(work), Unit("eval", shard.run)
    return write_prediction_shard(folder.shard_file(unit, shard.shard), folder.record_file(unit, shard.shard), shard,
                                  extra_record={"set": set_id})
