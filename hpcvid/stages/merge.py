"""The merge stage: one file (``WORK/features.h5``) that sees every shard's features, for fast training reads.

It writes the merged features file described in :mod:`hpcvid.storage.merged` (the layout and its reader
live there): every video's features copied into one chunked, checksummed ``(N_frames_total, D)`` dataset
per backbone plus per-video offsets, and the train split's mean/std computed on the way with the rule of
:mod:`hpcvid.learn.statistics`. Every shard read is checksummed: a damaged chunk stops the merge with a
one-line StoreError, and since the output is written under a temporary name, no ``features.h5`` (and no
record) comes out of a damaged shard.

The record ``features.json`` beside the output is written last; a rerun with the same source records is
skipped (``--force`` rebuilds).

It merges the current, complete set of one features unit (``merge.features_dir``: WORK/extract by default,
or WORK/features/<run>) and records which records it was made from; a rerun whose sources are unchanged is
skipped, and readers (the trainer) use the file only while it matches the unit's current set.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcvid.config import Config
from hpcvid.errors import ConfigError, StoreError
from hpcvid.fileio import atomic_path, read_json, sha256_file, write_record
from hpcvid.learn.statistics import FeatureStatistics
from hpcvid.storage.h5 import FEATURE_CHUNK_ROWS, create_array, write_array, write_text
from hpcvid.storage.merged import MERGED_KIND, MERGED_SCHEMA_VERSION
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder, merge_unit, redo_hint

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features-dir", metavar="DIR",
                        help="feature shards to merge: WORK/extract (default) or WORK/features/<run>")
    parser.add_argument("--output", metavar="PATH",
                        help="merged file (default WORK/features.h5, or DIR/features.h5 with --features-dir)")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"merge.features_dir": args.features_dir, "merge.output": args.output}


def source_unit(work: WorkFolder, features_dir: Path | str | None) -> Unit:
    """The unit whose shards are merged: the extraction, or the features of a trained CNN (WORK/features/<run>)."""
    if not features_dir:
        return Unit("extract")
    folder = Path(features_dir)
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    for unit in [Unit("extract")] + [Unit("features", sub.name) for sub in work.unit_dir(Unit("features", "x")).parent
                                     .glob("*") if sub.is_dir()]:
        if work.unit_dir(unit).resolve() == folder.resolve():
            return unit
    raise ConfigError(f"merge.features_dir = {features_dir}: merge reads the shards of its work folder "
                      f"{work.root}: {work.unit_dir(Unit('extract'))} or a folder of {work.unit_dir(Unit('features', 'x')).parent}")


def unit(config: Config) -> Unit:
    return merge_unit(source_unit(WorkFolder.of(config), config.merge.features_dir))


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """Merge is one unit of work; a merged file that is up to date is skipped by :func:`merge` itself."""
    WorkFolder.of(config).require("merge")
    return [ShardSpec(0, 1, force)]


def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Merge the current set of the configured features unit (a plain function, like every stage)."""
    return merge(config.work_dir, features_dir=config.merge.features_dir or None,
                 output=config.merge.output or None, force=spec.force)


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    for record in records:
        state = "up to date" if record.get("skipped") else f"written in {record['timings']['seconds']:.1f} s"
        print(f"merge: {record['output']} ({state}): {record['n_videos']} videos, {record['n_frames']} frames, "
              f"backbones {', '.join(record['backbones']) or 'none'}, from {len(record['sources'])} shard(s)")
    return 0


# ------------------------------------------------------------------------------------------ merging
@dataclass
class _Video:
    id: str
    label: int
    class_name: str
    split: str
    length: int
    feature_shard: Path


def merge(work: Path | str, *, features_dir: Path | str | None = None, output: Path | str | None = None,
          force: bool = False) -> dict[str, Any]:
    """Build the merged file from the current shard set of a features unit; return (and write) its record.

    A merged file whose record names the same source records (by sha256) is up to date and skipped.
    """
    import h5py

    started = time.time()
    folder = WorkFolder(work).require("merge")
    source = source_unit(folder, features_dir)
    output = Path(output) if output else folder.merged_file(source)
    records = folder.current_records(source)
    shard_set = folder.current_set(source)
    sources = [{"record": folder.relative(p), "sha256": sha256_file(p)} for p in records]
    record_file = output.with_suffix(".json")
    if not force and output.is_file() and record_file.is_file():
        previous = read_json(record_file)
        if previous.get("sources") == sources and previous.get("set") == shard_set.id:
            log.info("%s is up to date with %d shard record(s); --force rebuilds it", output, len(sources))
            return {**previous, "skipped": True}
    videos = _collect_videos(folder, source, records)
    backbones, score_names, classes = _common_datasets(videos, work)
    with atomic_path(output) as temporary:
        with h5py.File(temporary, "w") as out:
            offsets = _write_index(out, videos)
            stats = {name: _copy_features(out, videos, offsets, "features", name) for name in backbones}
            for name in score_names:
                _copy_features(out, videos, offsets, "scores", name)
            for name, (mean, std, meta) in stats.items():
                write_array(out, f"stats/{name}/mean", mean, chunk_rows=len(mean))
                write_array(out, f"stats/{name}/std", std, chunk_rows=len(std))
                out[f"stats/{name}"].attrs.update(meta)
            out.attrs.update(schema_version=MERGED_SCHEMA_VERSION, kind=MERGED_KIND,
                             classes=json.dumps(classes), backbones=json.dumps(backbones),
                             scores=json.dumps(score_names), sources=json.dumps(sources), set=shard_set.id)
    fields = {
        "output": folder.relative(output), "source": str(source), "set": shard_set.id, "sources": sources,
        "n_videos": len(videos), "n_frames": int(sum(v.length for v in videos)), "backbones": backbones,
        "scores": score_names, "classes": classes,
        "splits": {s: sum(v.split == s for v in videos) for s in sorted({v.split for v in videos})},
        "stats": {name: meta for name, (_, _, meta) in stats.items()},
        "timings": {"seconds": round(time.time() - started, 3)},
    }
    return write_record(record_file, fields, kind="hpcvid.merge.record", schema_version=MERGED_SCHEMA_VERSION,
                        describes=output)


def _collect_videos(folder: WorkFolder, source: Unit, records: Sequence[Path]) -> list[_Video]:
    """Every video listed in the records, with its attributes read from the shard; sorted by id.

    Each shard is checked against the sha256 of its record before anything is read from it.
    """
    from hpcvid.storage.shards import ShardReader

    videos: dict[str, _Video] = {}
    for record_file in records:
        record = read_json(record_file)
        shard_file = record_file.parent / record["file"]
        folder.verify(shard_file, record["sha256"], fix=redo_hint(source, record["index"]))
        with ShardReader(shard_file) as reader:
            for item in record["videos"]:
                info = reader.info(item["id"])
                if item["id"] in videos:
                    raise StoreError(f"video {item['id']!r} is in two shards ({videos[item['id']].feature_shard} "
                                     f"and {shard_file}): remove stale shards and re-run extract")
                videos[item["id"]] = _Video(item["id"], int(info["label"]), str(info["class_name"]),
                                            str(info["split"]), int(info["frames"]), shard_file)
    if not videos:
        raise StoreError(f"the shards of {records[0].parent if records else 'the set'} hold no video: nothing to "
                         "merge (see their records' 'failed')")
    return [videos[k] for k in sorted(videos)]


def _common_datasets(videos: Sequence[_Video], work: Path) -> tuple[list[str], list[str], list[str]]:
    """Backbones (and score sets) every video has; the class names by label."""
    from hpcvid.storage.shards import ShardReader

    backbones: set[str] | None = None
    scores: set[str] | None = None
    names: dict[int, str] = {}
    by_shard: dict[Path, list[_Video]] = {}
    for video in videos:
        by_shard.setdefault(video.feature_shard, []).append(video)
        names[video.label] = video.class_name
    for shard, members in by_shard.items():
        with ShardReader(shard) as reader:
            for video in members:
                info = reader.info(video.id)
                backbones = set(info["features"]) if backbones is None else backbones & set(info["features"])
                scores = set(info["scores"]) if scores is None else scores & set(info["scores"])
    if not backbones:
        raise StoreError("no feature set is common to every video: extract with a backbone (not 'none') first")
    classes = _class_names(work, names)
    return sorted(backbones), sorted(scores or ()), classes


def _class_names(work: Path, names: dict[int, str]) -> list[str]:
    """Class names by label, from the manifest when it is there (it knows classes with no video)."""
    from hpcvid.storage.manifest import load_manifest

    try:
        return list(load_manifest(work).classes)
    except StoreError:  # no manifest beside the shards: the labels seen
        return [names.get(i, f"class{i}") for i in range(max(names) + 1)]


def _write_index(out: Any, videos: Sequence[_Video]) -> np.ndarray:
    lengths = np.array([v.length for v in videos], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    index = out.create_group("videos")
    rows = max(1, len(videos))
    write_array(index, "offset", offsets, chunk_rows=rows)
    write_array(index, "length", lengths, chunk_rows=rows)
    write_array(index, "label", np.array([v.label for v in videos], dtype=np.int64), chunk_rows=rows)
    for name in ("id", "class_name", "split"):
        write_text(index, name, [getattr(v, name) for v in videos], chunk_rows=rows)
    base = Path(out.filename).parent
    write_text(index, "feature_shard", [os.path.relpath(v.feature_shard, base) for v in videos], chunk_rows=rows)
    return offsets


def _copy_features(out: Any, videos: Sequence[_Video], offsets: np.ndarray, kind: str,
                   name: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Copy ``kind/name`` (T, D) of every video into one (N_total, D) dataset; train mean/std on the way."""
    from hpcvid.storage.shards import ShardReader

    total = int(sum(v.length for v in videos))
    dataset = None
    stats = FeatureStatistics()
    readers: dict[Path, Any] = {}
    try:
        for video, offset in zip(videos, offsets):
            reader = readers.setdefault(video.feature_shard, ShardReader(video.feature_shard))
            values = reader.features(video.id, name) if kind == "features" else reader.scores(video.id, name)
            if dataset is None:
                dataset = create_array(out, f"{kind}/{name}", (total, values.shape[1]), np.float32,
                                       chunk_rows=FEATURE_CHUNK_ROWS)
            elif values.shape[1] != dataset.shape[1]:
                raise StoreError(f"{kind}/{name} of {video.id!r} has {values.shape[1]} columns, others "
                                 f"{dataset.shape[1]}")
            dataset[offset:offset + len(values)] = values
            if video.split == "train":
                stats.add(values)
    finally:
        for reader in readers.values():
            reader.close()
    if stats.count == 0:
        log.warning("no train video: the mean/std of %s/%s are taken over every video", kind, name)
        for video, offset in zip(videos, offsets):
            stats.add(dataset[offset:offset + video.length])
    return stats.finish()
