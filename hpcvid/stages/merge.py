"""The merge stage: one file (``WORK/features.h5``) that sees every shard's features, for fast training reads.

Why one contiguous dataset per backbone: a training step reads random windows of L frames from random
videos; with all features of all videos in one unchunked ``(N_frames_total, D)`` float32 dataset plus
per-video offsets, a window is a single contiguous slice (DESIGN section 8: fastest of the layouts
measured, ~30x faster than per-frame ``.npy`` files). Videos are sorted by id, so the merged file does
not depend on how many shards extraction used.

Layout of ``features.h5`` (root attributes ``schema_version``, ``kind = "hpcvid.merged"``, ``classes`` and
``backbones`` as JSON, ``sources``: the shard records it was built from)::

    features/<backbone>        (N_frames_total, D) float32, contiguous
    scores/<name>              (N_frames_total, C) float32, when every video has them
    videos/id, class_name, split, shard, group, feature_shard   (N,) utf-8 strings
    videos/offset, length, label                                (N,) int64
    stats/<backbone>/mean, std (D,) float32: train split only; attrs n_frames, n_videos, epsilon, split

``videos/shard`` + ``videos/group`` point at each video's frames and flow in its extract shard (paths
relative to the merged file's folder); ``feature_shard`` is where its features came from (the extract
shard, or a features-only shard of ``--features-dir``).

``std`` is floored at a *scale-relative* epsilon (1e-6 x the RMS of the train features): untrained
GoogLeNet's features are ~1e-12, and any fixed epsilon would erase them (DESIGN section 8).

The record ``features.json`` beside the output is written last; a rerun with the same source records is
skipped (``--force`` rebuilds).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from hpcvid.config import Config
from hpcvid.errors import ConfigError, StoreError
from hpcvid.fileio import atomic_path, atomic_write_json, read_json, sha256_file
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder, merge_unit, redo_hint

log = logging.getLogger(__name__)

MERGED_SCHEMA_VERSION = 1
MERGED_KIND = "hpcvid.merged"
RELATIVE_EPSILON = 1e-6


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
    group: str
    shard: str = ""
    frames_group: str = ""


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
            stats = {name: _copy_features(out, videos, offsets, f"features/{name}") for name in backbones}
            for name in score_names:
                _copy_features(out, videos, offsets, f"scores/{name}")
            for name, (mean, std, meta) in stats.items():
                out.create_dataset(f"stats/{name}/mean", data=mean)
                out.create_dataset(f"stats/{name}/std", data=std)
                out[f"stats/{name}"].attrs.update(meta)
            out.attrs.update(schema_version=MERGED_SCHEMA_VERSION, kind=MERGED_KIND,
                             classes=json.dumps(classes), backbones=json.dumps(backbones),
                             scores=json.dumps(score_names), sources=json.dumps(sources), set=shard_set.id)
    record = {
        "schema_version": MERGED_SCHEMA_VERSION, "kind": "hpcvid.merge.record", "output": folder.relative(output),
        "source": str(source), "set": shard_set.id, "sources": sources, "n_videos": len(videos),
        "n_frames": int(sum(v.length for v in videos)), "backbones": backbones, "scores": score_names,
        "classes": classes, "splits": {s: sum(v.split == s for v in videos) for s in sorted({v.split for v in videos})},
        "stats": {name: meta for name, (_, _, meta) in stats.items()},
        "sha256": sha256_file(output),
        "timings": {"seconds": round(time.time() - started, 3)},
    }
    atomic_write_json(record_file, record)
    return read_json(record_file)


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
                                            str(info["split"]), int(info["frames"]), shard_file,
                                            reader.group(item["id"]).name.rsplit("/", 1)[-1])
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
    import h5py

    text = h5py.string_dtype("utf-8")
    lengths = np.array([v.length for v in videos], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    index = out.create_group("videos")
    index.create_dataset("offset", data=offsets)
    index.create_dataset("length", data=lengths)
    index.create_dataset("label", data=np.array([v.label for v in videos], dtype=np.int64))
    for name in ("id", "class_name", "split", "shard"):
        index.create_dataset(name, data=[getattr(v, name) for v in videos], dtype=text)
    index.create_dataset("group", data=[v.frames_group for v in videos], dtype=text)
    base = Path(out.filename).parent
    index.create_dataset("feature_shard", data=[os.path.relpath(v.feature_shard, base) for v in videos], dtype=text)
    return offsets


def _copy_features(out: Any, videos: Sequence[_Video], offsets: np.ndarray,
                   name: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Copy one (T, D) dataset of every video into a contiguous (N_total, D) one; train mean/std on the way."""
    from hpcvid.storage.shards import ShardReader

    total = int(sum(v.length for v in videos))
    dataset = None
    stats = _RunningStats()
    readers: dict[Path, Any] = {}
    try:
        for video, offset in zip(videos, offsets):
            reader = readers.setdefault(video.feature_shard, ShardReader(video.feature_shard))
            values = reader._dataset(video.id, name)[()].astype(np.float32, copy=False)
            if dataset is None:
                dataset = out.create_dataset(name, shape=(total, values.shape[1]), dtype=np.float32)
            elif values.shape[1] != dataset.shape[1]:
                raise StoreError(f"{name} of {video.id!r} has {values.shape[1]} columns, others {dataset.shape[1]}")
            dataset[offset:offset + len(values)] = values
            if video.split == "train":
                stats.add(values)
    finally:
        for reader in readers.values():
            reader.close()
    if stats.count == 0:
        log.warning("no train video: the mean/std of %s are taken over every video", name)
        for video, offset in zip(videos, offsets):
            stats.add(dataset[offset:offset + video.length])
    return stats.finish()


class _RunningStats:
    """Mean and variance in float64, combined per video (Chan et al.), stable for features of any scale."""

    def __init__(self) -> None:
        self.count = 0
        self.videos = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.square_sum = 0.0

    def add(self, values: np.ndarray) -> None:
        if len(values) == 0:
            return
        x = np.asarray(values, dtype=np.float64)
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        self.square_sum += float((x ** 2).sum())
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
            self.count = total
        self.videos += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        if self.mean is None or self.m2 is None:
            raise StoreError("no frames to compute feature statistics from")
        std = np.sqrt(self.m2 / max(self.count, 1))
        rms = np.sqrt(self.square_sum / (self.count * len(std)))
        epsilon = max(RELATIVE_EPSILON * rms, float(np.finfo(np.float32).tiny))
        meta = {"n_frames": int(self.count), "n_videos": int(self.videos), "epsilon": float(epsilon),
                "rms": float(rms)}
        return self.mean.astype(np.float32), np.maximum(std, epsilon).astype(np.float32), meta


# ------------------------------------------------------------------------------------------ reading
class Entry(NamedTuple):
    """One video of the merged file."""

    id: str
    label: int
    split: str
    offset: int
    length: int


class MergedFeatures:
    """Read the merged file: per-video entries, random windows, statistics, references to frames and flow.

    Lazy and picklable: the metadata is read once with a short-lived handle; the HDF5 file itself is
    opened on first data access in the current process (so a DataLoader may fork or spawn workers after
    creating it, DESIGN section 8) and dropped when pickled.
    """

    def __init__(self, path: Path | str, backbone: str | None = None) -> None:
        import h5py

        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path} does not exist: run `hpcvid run merge --work WORK` first")
        try:
            handle = h5py.File(self.path, "r")
        except OSError as exc:
            raise StoreError(f"{self.path} is not a readable HDF5 file ({exc}): rebuild it with "
                             "`hpcvid run merge --force`") from exc
        with handle:
            version = handle.attrs.get("schema_version")
            if version != MERGED_SCHEMA_VERSION or handle.attrs.get("kind") != MERGED_KIND:
                raise StoreError(f"{self.path} is not a merged features file of schema {MERGED_SCHEMA_VERSION} "
                                 f"(schema_version {version}): rebuild it with `hpcvid run merge --force`")
            self.backbones: list[str] = json.loads(handle.attrs["backbones"])
            self.score_names: list[str] = json.loads(handle.attrs["scores"])
            self.classes: list[str] = json.loads(handle.attrs["classes"])
            if backbone is None:
                backbone = self.backbones[0]
            if backbone not in self.backbones:
                raise StoreError(f"{self.path} has no features of {backbone!r}; it has {', '.join(self.backbones)}")
            self.backbone = backbone
            index = handle["videos"]
            ids = [_text(v) for v in index["id"][()]]
            splits = [_text(v) for v in index["split"][()]]
            labels, offsets, lengths = index["label"][()], index["offset"][()], index["length"][()]
            self.entries: list[Entry] = [Entry(i, int(l), s, int(o), int(n))
                                         for i, l, s, o, n in zip(ids, labels, splits, offsets, lengths)]
            self.class_names = [_text(v) for v in index["class_name"][()]]
            self._shards = [_text(v) for v in index["shard"][()]]
            self._groups = [_text(v) for v in index["group"][()]]
            self.mean = handle[f"stats/{backbone}/mean"][()]
            self.std = handle[f"stats/{backbone}/std"][()]
            self.dim = int(handle[f"features/{backbone}"].shape[1])
        self._file: Any = None
        self._features: Any = None
        self._pid: int | None = None
        self._readers: dict[str, Any] = {}

    # lifecycle
    def _data(self) -> Any:
        if self._file is None or self._pid != os.getpid():
            import h5py

            self._file, self._pid, self._readers = h5py.File(self.path, "r"), os.getpid(), {}
            self._features = self._file[f"features/{self.backbone}"]  # looked up once per process
        return self._file

    def close(self) -> None:
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
            for reader in self._readers.values():
                reader.close()
        self._file, self._features, self._readers = None, None, {}

    def __enter__(self) -> "MergedFeatures":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(_file=None, _features=None, _pid=None, _readers={})
        return state

    def __len__(self) -> int:
        return len(self.entries)

    # features
    def indices(self, split: str) -> list[int]:
        """Positions of the videos of one split ('train', 'test', 'unused')."""
        return [i for i, e in enumerate(self.entries) if e.split == split]

    def window(self, i: int, start: int, length: int) -> np.ndarray:
        """float32 (length, D): frames ``start .. start+length-1`` of video ``i``, reading only those rows."""
        entry = self.entries[i]
        if start < 0 or length < 0 or start + length > entry.length:
            raise ValueError(f"window [{start}, {start + length}) is outside video {entry.id!r} "
                             f"of {entry.length} frames")
        self._data()
        return self._features[entry.offset + start: entry.offset + start + length]

    def video(self, i: int) -> np.ndarray:
        """float32 (T, D): every frame's features of video ``i``."""
        return self.window(i, 0, self.entries[i].length)

    def normalise(self, features: np.ndarray) -> np.ndarray:
        """(x - mean) / std with the train-split statistics (std already floored scale-relatively)."""
        return (features - self.mean) / self.std

    def scores(self, i: int, name: str) -> np.ndarray:
        entry = self.entries[i]
        if name not in self.score_names:
            raise StoreError(f"{self.path} has no scores {name!r}; it has {self.score_names or 'none'}")
        return self._data()[f"scores/{name}"][entry.offset: entry.offset + entry.length]

    # frames and flow, through the extract shards
    def shard_of(self, i: int) -> tuple[Path, str]:
        """(extract shard file, group name) holding video ``i``'s frames and flow."""
        if not self._shards[i]:
            raise StoreError(f"{self.path} has no extract shard for {self.entries[i].id!r} (merged from a "
                             "features-only folder without WORK/extract)")
        return self.path.parent / self._shards[i], self._groups[i]

    def _reader(self, i: int) -> Any:
        from hpcvid.storage.shards import ShardReader

        self._data()  # resets the reader cache after a fork
        shard, _ = self.shard_of(i)
        key = str(shard)
        if key not in self._readers:
            self._readers[key] = ShardReader(shard)
        return self._readers[key]

    def frames(self, i: int, indices: Sequence[int] | None = None) -> np.ndarray:
        return self._reader(i).frames(self.entries[i].id, indices)

    def flow(self, i: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        return self._reader(i).flow(self.entries[i].id, start, stop)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)
