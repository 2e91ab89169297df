"""The extract stage: per shard, decode every video, compute optical flow and CNN features, write one HDF5 shard.

``run_shard(config, spec)`` is the whole stage for one shard, a plain module-level function of
(resolved config, shard spec): the in-process runner, submitit array jobs and MPI ranks all call it.

Kill-safety (a SIGKILL at any instant leaves nothing that looks complete; a rerun redoes at most the video
in flight; the result equals an uninterrupted run's), because HDF5 itself is not crash-safe:

1. each finished video is written to its own small file ``WORK/extract/shard-I-of-N.parts/<key>.h5``
   (temporary name + rename), a failed video to ``<key>.failed.json``;
2. when every video has a part, the shard ``shard-I-of-N.h5`` is assembled from the parts in shard order
   under a temporary name and renamed;
3. then the record ``shard-I-of-N.json`` is written (atomically): "record exists" = "shard done";
4. then the parts folder is deleted.

A rerun deletes this shard's stale temporary files, reuses finished parts and redoes the rest. The parts
folder remembers the settings it was made with; parts made with other settings are discarded.
Contents are deterministic: no clock times inside datasets, timings live in the record only.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from hpcvid.config import Config
from hpcvid.errors import ConfigError, PartialFailure, ResourceError, StoreError, VideoError, machine_fault
from hpcvid.fileio import atomic_write_json, read_json, write_record
from hpcvid.launch.sharding import ShardSpec, all_shards, select
from hpcvid.learn.backbones import BACKBONES, FEATURE_DIMS
from hpcvid.storage.manifest import Manifest, VideoEntry, content_digest, load_manifest
from hpcvid.workfolder import Unit, WorkFolder, digest

log = logging.getLogger(__name__)

RECORD_SCHEMA_VERSION = 2
REASON_MAX = 300
RANDOM_INIT_SEED = 0
"""Seed of the randomly initialised backbone (no --weights): the same network in every process."""
UNIT = Unit("extract")


# ------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import positive_int

    parser.add_argument("--dataset", metavar="DIR",
                        help="dataset folder; overrides dataset.root (also: where a moved dataset now lies)")
    parser.add_argument("--shards", type=positive_int, metavar="N", help="number of shards (default: extract.shards)")
    parser.add_argument("--weights", metavar="PATH", help="local backbone weights (.pt/.pth state dict)")
    parser.add_argument("--backbone", choices=(*BACKBONES, "none"), help="CNN for features")
    parser.add_argument("--flow", choices=_config_choices("flow"), help="optical flow algorithm")
    parser.add_argument("--flow-weights", metavar="PATH", help="raft: local state dict of torchvision's RAFT")


def _config_choices(name: str) -> tuple:
    """The valid values of ``extract.<name>``, read from the config so the flag cannot fall behind it."""
    import dataclasses

    from hpcvid.config import ExtractConfig

    return next(f for f in dataclasses.fields(ExtractConfig) if f.name == name).metadata["choices"]


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "extract.shards": args.shards,
        "extract.weights": args.weights,
        "extract.backbone": args.backbone,
        "extract.flow": args.flow,
        "extract.flow_weights": args.flow_weights,
        "dataset.root": args.dataset,
    }


def unit(config: Config) -> Unit:
    return UNIT


def identity(config: Config, manifest: Manifest) -> dict[str, Any]:
    """What determines a shard's contents: the settings, the shard schema and the indexed videos.

    Not the dataset's location: a dataset moved elsewhere (same files) extracts to the same shards.
    """
    return {"settings": _settings_fingerprint(config), "schema": _store_schema(), "manifest": content_digest(manifest)}


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """Make this extraction the current set; return its shards without a record of it (all with --force)."""
    if config.extract.flow == "raft":  # loads the file once: a wrong one stops here, before any work
        from hpcvid.media.raft import check_raft_weights

        check_raft_weights(config.extract.flow_weights, config.extract.raft_model)
    manifest = ensure_manifest(config)
    if config.extract.backbone != "none" and config.extract.weights:
        from hpcvid.learn.backbones import require_weights_file

        require_weights_file(config.extract.weights, config.extract.backbone)
    return WorkFolder.of(config).plan(UNIT, config.extract.shards, identity(config, manifest), only=only,
                                      force=force)


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print what was done; exit 0, or raise PartialFailure (exit 3) when videos failed in any finished shard."""
    work = WorkFolder.of(config)
    count = config.extract.shards
    for record in records:
        timing = record.get("timings", {})
        print(f"shard {record['shard']}: {record['n_videos']} videos, {record['n_frames']} frames, "
              f"{record['n_failed']} failed, {timing.get('seconds', 0):.1f} s "
              f"({timing.get('frames_per_s', 0):.1f} frames/s)")
    done = [read_json(work.record_file(UNIT, spec)) for spec in all_shards(count) if work.is_current(UNIT, spec)]
    print(f"extract: {len(done)} of {count} shards done in {work.unit_dir(UNIT)}"
          + ("" if records else " (nothing to do)"))
    for warning in sorted({w for record in done for w in record.get("warnings", ())}):
        print(f"warning: {warning}")
    failed = [(record, failure) for record in done for failure in record["failed"]]
    if failed:
        where = sorted({str(work.unit_dir(UNIT) / f"shard-{r['shard']}.json") for r, _ in failed})
        raise PartialFailure(f"{len(failed)} video(s) failed; the list (video, path, reason) is under "
                             f"'failed' in {', '.join(where)}")
    return 0


# ------------------------------------------------------------------------------------------ the files
def part_key(entry: VideoEntry) -> str:
    """The name of a video's part files: its id plus the file's size and mtime, so that a video replaced
    between an interrupted run and its resume is extracted again rather than taken from the old part."""
    key = f"{entry.id}|{entry.size}|{entry.mtime!r}"
    return hashlib.sha1(key.encode("utf-8")).hexdigest()[:24]


def ensure_manifest(config: Config) -> Manifest:
    """Load WORK/manifest.json; when it is missing and a dataset is configured, index it first."""
    work = WorkFolder.of(config)
    if not work.manifest.is_file() and config.dataset.root:
        from hpcvid.stages.index import index_dataset

        log.info("%s is missing: indexing %s first", work.manifest, config.dataset.root)
        index_dataset(config)
    return load_manifest(config.work_dir)


# ----------------------------------------------------------------------------------------- the stage
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Extract shard ``spec`` and return its record. Resumes from finished parts; --force starts over."""
    work = WorkFolder.of(config)
    record_file, shard_file, parts = work.record_file(UNIT, spec), work.shard_file(UNIT, spec), work.parts_dir(UNIT, spec)
    manifest = ensure_manifest(config)
    shard_set = work.ensure_set(UNIT, spec.count, identity(config, manifest))
    if spec.force or (record_file.is_file() and not work.is_current(UNIT, spec)):
        _remove_shard_outputs(record_file, shard_file, parts)   # redo, or a record of an older set
    elif record_file.is_file():
        shutil.rmtree(parts, ignore_errors=True)  # a kill after the record, before the clean-up
        return read_json(record_file)
    started = time.time()
    videos = select(manifest.videos, spec, key=lambda v: v.id)
    check_space(config, videos, work.unit_dir(UNIT), spec)
    _prepare_parts(config, parts, shard_file, record_file)
    runner = _VideoRunner(config, manifest, dataset_roots(config, manifest))
    try:
        outcomes = runner.run_all(videos, parts, spec)
    except ResourceError as fault:
        raise ResourceError(f"{fault}; no video was recorded as failed for it") from fault
    ok_parts = [parts / f"{part_key(v)}.h5" for v, outcome in zip(videos, outcomes) if outcome["ok"]]
    from hpcvid.storage.shards import KIND_EXTRACT, assemble_shard

    meta = {"shard": spec.name, "config": _settings_fingerprint(config), "dataset": manifest.dataset}
    assemble_shard(shard_file, ok_parts, kind=KIND_EXTRACT, meta=meta)
    fields = {**_make_record(config, spec, videos, outcomes, runner, started), "set": shard_set.id}
    record = write_record(record_file, fields, kind="hpcvid.extract.record", schema_version=RECORD_SCHEMA_VERSION,
                          describes=shard_file)
    shutil.rmtree(parts, ignore_errors=True)
    return record  # as read back: exactly what a later call (or another process) will see


# bytes per kept frame of each stored part, on the generous side: an estimate that errs low would let a
# shard start and stop half-way on a full disk
_COMPRESSION = {"none": 1.0, "lzf": 4.0, "gzip": 6.0}


def settings_digest(config: Config) -> str:
    """Which settings rates were measured with: those that change the work per frame, and the device."""
    return digest({"settings": _settings_fingerprint(config), "device": config.extract.device})


def rates(config: Config, manifest: Manifest, *, recalibrate: bool = False, log_to: Any = None) -> Any:
    """This job's extraction rates: WORK/bench.json when it was measured with these settings, else a
    calibration on a few of the dataset's own videos (written to WORK/bench.json for the next time)."""
    from hpcvid.launch.planning import Rates

    work = WorkFolder.of(config)
    if work.rates.is_file() and not recalibrate:
        try:
            stored = Rates.from_dict(read_json(work.rates))
        except (OSError, ValueError, TypeError, KeyError):
            stored = None
        if stored is not None and stored.settings == settings_digest(config):
            return stored
    measured = calibrate(config, manifest, log_to=log_to)
    atomic_write_json(work.rates, measured.to_dict())
    return measured


def calibrate(config: Config, manifest: Manifest, videos: int = 3, log_to: Any = None) -> Any:
    """Extract ``videos`` of the dataset's own videos (short, median and long ones) with the job's settings
    in a scratch folder, and time it: frames per second of the per-video work, and the start-up around it."""
    import tempfile

    from hpcvid.config import replace
    from hpcvid.launch.planning import Rates
    from hpcvid.storage.manifest import write_manifest

    readable = sorted((v for v in manifest.videos if v.frames and not v.probe_error), key=lambda v: (v.frames, v.id))
    if not readable:
        raise StoreError(f"{WorkFolder.of(config).manifest} has no readable video to measure extraction on")
    picks = sorted({readable[round(i * (len(readable) - 1) / max(1, videos - 1))] for i in range(videos)},
                   key=lambda v: v.id)
    if log_to is not None:
        print(f"calibrating on {len(picks)} of the dataset's videos with the job's settings ...", file=log_to)
    roots = dataset_roots(config, manifest)
    with tempfile.TemporaryDirectory(prefix="hpcvid-calibrate-") as scratch:
        mini = dataclasses.replace(manifest, videos=tuple(picks),
                                   dataset={**manifest.dataset, "root": str(roots[0]),
                                            "extra_roots": [str(r) for r in roots[1:]]})
        write_manifest(mini, scratch)
        # one process: the busy seconds are then one core's, and the wall time around them the start-up
        trial = replace(config, work=scratch, **{"extract.shards": 1, "dataset.root": str(roots[0]),
                                                 "extract.workers": 0})
        began = time.perf_counter()
        record = run_shard(trial, ShardSpec(0, 1))
        wall = time.perf_counter() - began
    busy = sum(record["timings"]["stage_seconds"].values())
    frames = record["timings"]["frames_processed"]
    if not frames or busy <= 0:
        raise StoreError("the calibration extracted nothing (see the warnings above): fix the dataset first")
    return Rates(frames_per_s=frames / busy, per_video_s=0.0, startup_s=max(0.0, wall - busy),
                 settings=settings_digest(config), host=socket.gethostname(),
                 measured=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), videos=len(picks))


def make_walltime_plan(config: Config, target_s: float | None = None, *, recalibrate: bool = False,
                       log_to: Any = None) -> tuple[Any, Any, Manifest]:
    """(plan, rates, manifest) of this extraction: per-shard frames and predicted times, the walltime to ask."""
    from hpcvid.launch.planning import kept_frames, make_plan

    manifest = ensure_manifest(config)
    measured = rates(config, manifest, recalibrate=recalibrate, log_to=log_to)
    plan = make_plan(kept_frames(manifest.videos, config.extract), config.extract.shards, measured, target_s)
    return plan, measured, manifest


def walltime_needed(config: Config, specs: Sequence[ShardSpec]) -> float:
    """Seconds of walltime the largest of ``specs`` needs (its predicted time with the margin)."""
    import sys

    from hpcvid.launch.planning import with_margin

    plan, _, _ = make_walltime_plan(config, log_to=sys.stdout)
    wanted = {spec.index for spec in specs}
    return with_margin(max(load.seconds for load in plan.loads if load.index in wanted))


def estimate_bytes(config: Config, videos: Sequence[VideoEntry]) -> int:
    """About how many bytes extracting ``videos`` writes: their parts and the assembled shard, side by side.

    From the manifest's frame counts and sizes and the settings: JPEG frames at a quarter of their raw size
    (about 1/7 to 1/11 was measured at quality 90), flow at 2 bytes per pixel (uint8) or 4 (float16)
    divided by its compression's usual ratio, float32 features.
    """
    from hpcvid.launch.planning import kept_frames
    from hpcvid.media.decode import output_size

    cfg = config.extract
    total = 0.0
    frames_of = kept_frames(videos, cfg)
    for entry in videos:
        if not entry.frames or not entry.width or not entry.height:
            continue
        kept = frames_of[entry.id]
        width, height = output_size(int(entry.width), int(entry.height), cfg)
        pixels = width * height
        frame = pixels * 3 * (0.25 if cfg.frame_storage == "jpeg" else 1.0)
        flow = 0.0 if cfg.flow == "none" else pixels * (2 if cfg.flow_storage == "uint8" else 4) / \
            _COMPRESSION[cfg.flow_compression]
        features = 0 if cfg.backbone == "none" else 4 * FEATURE_DIMS[cfg.backbone]
        total += kept * (frame + flow + features) + 64 * 1024
    return int(2 * total)


def check_space(config: Config, videos: Sequence[VideoEntry], folder: Path, spec: ShardSpec) -> None:
    """Refuse to start a shard that cannot fit on its file system (the machine's fault, not the videos')."""
    import shutil as _shutil

    folder.mkdir(parents=True, exist_ok=True)
    needed = estimate_bytes(config, videos)
    free = _shutil.disk_usage(folder).free
    if needed > free:
        raise ResourceError(f"{folder}: extract shard {spec.name} needs about {needed / 2**20:.0f} MiB (estimated "
                            f"from the manifest's frame counts), {free / 2**20:.0f} MiB are free: free space or use "
                            "a larger file system (--work), then rerun")


def _remove_shard_outputs(record_file: Path, shard_file: Path, parts: Path) -> None:
    """--force: the record goes first, so the shard never looks done while it is being redone."""
    for path in (record_file, shard_file):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(parts, ignore_errors=True)


def _prepare_parts(config: Config, parts: Path, shard_file: Path, record_file: Path) -> None:
    """Create the parts folder, drop stale temporaries and parts made with other settings."""
    from hpcvid.fileio import remove_stale_partials

    for name in (shard_file.name, record_file.name):  # only this shard's temporaries: others may be running
        for partial in shard_file.parent.glob(f".{name}.*.partial"):
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
    settings = {"extract": _settings_fingerprint(config), "schema": _store_schema()}
    settings_file = parts / "settings.json"
    if parts.is_dir():
        remove_stale_partials(parts)
        for spool in parts.glob("*.spool"):  # a video in flight when the last run was killed
            shutil.rmtree(spool, ignore_errors=True)
        if not settings_file.is_file() or read_json(settings_file) != settings:
            log.info("%s was made with other settings: starting this shard over", parts)
            shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    if not settings_file.is_file():
        atomic_write_json(settings_file, settings)


def _settings_fingerprint(config: Config) -> dict[str, Any]:
    """The settings that change a video's stored contents (not the shard count: contents do not depend on it)."""
    settings = dict(config.extract.__dict__)
    for name in ("shards", "batch_size", "flow_batch_size", "tvl1_compile", "device", "max_attempts", "chunk_frames",
                 "workers"):
        settings.pop(name, None)
    return json.loads(json.dumps(settings, sort_keys=True))


def _store_schema() -> int:
    from hpcvid.storage.shards import SCHEMA_VERSION

    return SCHEMA_VERSION


def dataset_roots(config: Config, manifest: Manifest) -> list[Path]:
    """Where the videos are now: ``dataset.root`` (a job file or --dataset) when given, else where they were
    indexed; then the folders of ``dataset.extra_roots``, likewise. Video paths in the manifest are relative
    to their root, so a moved dataset needs only --dataset."""
    root = config.dataset.root or str(manifest.dataset.get("root", ""))
    if not root:
        raise StoreError(f"{WorkFolder.of(config).manifest} names no dataset root: pass --dataset DIR")
    extra = list(config.dataset.extra_roots) or list(manifest.dataset.get("extra_roots", []))
    return [Path(root), *(Path(folder) for folder in extra)]


# --------------------------------------------------------------------------------------- per video
# A video goes through two halves. The producer (:func:`produce`: decode, flow, and the stored forms of frames
# and flow, a chunk of frames at a time) runs in this process, or in worker processes that feed this one; the
# consumer (:class:`_Assembly`: CNN features in batches, the spool, the part file) always runs here, where the
# CNN's weights and the GPU are. Both paths run the same two halves, so they store the same bytes.

@dataclass
class _Chunk:
    """The next kept frames of a video: their numbers, the frames themselves (for the CNN; None without
    one, or when the features came with them), their stored form, the stored form of the flow pairs they
    complete, and their CNN features when the worker computed them (:class:`_HelpingCNN`)."""

    indices: Any
    frames: Any
    stored: Any
    frame_shape: tuple[int, ...]
    flow: Any
    seconds: dict[str, float]
    features: Any = None


@dataclass
class _Restart:
    """Drop what the video sent so far: it streams again (see :class:`hpcvid.media.decode.Restart`)."""


@dataclass
class _End:
    """The video streamed to its end: its facts, the last flow pairs (a torch flow's last batch)."""

    facts: Any
    flow: Any
    seconds: dict[str, float]


@dataclass
class _Failed:
    """The producer raised (a bad video, or a fault of the machine): the error, or its one-line stand-in."""

    error: BaseException


def check_video_file(entry: VideoEntry, path: Path) -> None:
    """Refuse, before decoding, a video that indexing could not read or that is not the file it indexed."""
    if entry.probe_error:
        raise VideoError(f"indexing could not read it: {entry.probe_error}")
    if not path.is_file():
        raise VideoError(f"{path} does not exist (moved or deleted since indexing? a moved dataset: "
                         "pass --dataset NEW_ROOT)")
    size = path.stat().st_size
    if size != entry.size:
        raise VideoError(f"{path} is not the video that was indexed ({size} bytes, indexed {entry.size}): "
                         "re-index with `hpcvid index` if the dataset changed")


def produce(cfg: Any, entry: VideoEntry, path: Path, want_frames: bool,
            helper: "_HelpingCNN | None" = None) -> Iterator[_Chunk | _Restart | _End]:
    """Decode, flow and encoding of one video, ``cfg.chunk_frames`` kept frames at a time (raises VideoError
    on bad input), and a chunk's CNN features when ``helper`` takes them on. Memory holds a chunk, the
    flow's carried frames and what the consumer has not taken."""
    from hpcvid.media.decode import FrameChunk, Restart, StreamInfo, stream_video
    from hpcvid.media.flow import FlowStream
    from hpcvid.storage.shards import StorageOptions, encode_flow, encode_frames

    check_video_file(entry, path)
    options = StorageOptions.from_config(cfg)
    items = stream_video(path, cfg, cfg.chunk_frames)
    flow = None
    seconds = {"decode": 0.0, "flow": 0.0, "write": 0.0, "features": 0.0}
    kept = 0        # frames of the video before this chunk: where the CNN's batches fall
    while True:
        began = time.perf_counter()
        item = next(items)
        seconds["decode"] += time.perf_counter() - began
        if isinstance(item, StreamInfo):
            flow = FlowStream(cfg.flow, **flow_params(cfg)) if cfg.flow != "none" else None
        elif isinstance(item, Restart):
            kept = 0
            yield _Restart()
        elif isinstance(item, FrameChunk):
            began = time.perf_counter()
            pairs = None if flow is None else flow.push(item.frames)
            seconds["flow"] += time.perf_counter() - began
            began = time.perf_counter()
            stored = encode_frames(item.frames, options)
            pairs = None if pairs is None else encode_flow(pairs, options)
            seconds["write"] += time.perf_counter() - began
            began = time.perf_counter()
            features = helper.features(item.frames, kept) if want_frames and helper is not None else None
            seconds["features"] += time.perf_counter() - began
            kept += len(item.frames)
            frames = item.frames if want_frames and features is None else None
            yield _Chunk(item.indices, frames, stored, item.frames.shape, pairs, seconds, features)
            seconds = dict.fromkeys(seconds, 0.0)
        else:
            began = time.perf_counter()
            tail = None if flow is None else encode_flow(flow.finish(), options)
            seconds["flow"] += time.perf_counter() - began
            yield _End(item, tail, seconds)
            return


class _FeatureBatches:
    """A video's frames to the CNN in batches counted from its first frame, as the CNN would batch the whole
    video (a batch's numbers may depend on what else is in it), whatever the chunks are."""

    def __init__(self, extractor: Any) -> None:
        self.extractor = extractor
        self.pending: Any = None

    def push(self, frames: Any) -> Any:
        """Features of the batches completed by ``frames`` (None when none is)."""
        import numpy as np

        pending = frames if self.pending is None else np.concatenate([self.pending, frames])
        ready = len(pending) - len(pending) % self.extractor.batch_size
        self.pending = pending[ready:].copy() if ready else pending
        return self.extractor.extract(pending[:ready]) if ready else None

    def finish(self) -> Any:
        pending, self.pending = self.pending, None
        return self.extractor.extract(pending) if pending is not None and len(pending) else None


class _Assembly:
    """The consumer half of one video: features in batches, the spooled part, the part file."""

    def __init__(self, runner: "_VideoRunner", entry: VideoEntry, path: Path, parts: Path) -> None:
        from hpcvid.storage.shards import PartWriter, StorageOptions

        self.runner, self.entry, self.path, self.parts = runner, entry, path, parts
        self.key = part_key(entry)
        self.options = StorageOptions.from_config(runner.cfg)
        with self.writing():
            _check_room(parts, estimate_bytes(runner.config, [entry]), entry)  # the spool and the part
            self.writer = PartWriter(parts / f"{self.key}.spool", self.options)
        self.features = _FeatureBatches(runner.extractor) if runner.extractor is not None else None

    def writing(self) -> Any:
        return _writing(self.parts, self.entry)

    def take(self, message: _Chunk | _Restart | _End) -> dict[str, Any] | None:
        """One message of the producer; the part's summary once the video ends."""
        runner = self.runner
        for name, value in message.seconds.items() if not isinstance(message, _Restart) else ():
            runner.seconds[name] += value
        if isinstance(message, _Restart):
            self.reset()
            return None
        features = None
        if isinstance(message, _Chunk) and message.features is not None:
            runner.chunks_by_workers += 1
            features = self._features(message.features)
        elif isinstance(message, _Chunk) and self.features is not None:
            features = self._features(self.features.push(message.frames))
        elif isinstance(message, _End) and self.features is not None:
            features = self._features(self.features.finish())
        began = time.perf_counter()
        with self.writing():
            if isinstance(message, _Chunk):
                self.writer.add(frame_indices=message.indices, frames=message.stored, frame_shape=message.frame_shape,
                                flow=message.flow, features=features)
            else:
                self.writer.add(flow=message.flow, features=features)
                summary = self.writer.finish(self.parts / f"{self.key}.h5", self.entry.id,
                                             self._attrs(message.facts), has_flow=runner.cfg.flow != "none")
        runner.seconds["write"] += time.perf_counter() - began
        return summary if isinstance(message, _End) else None

    def _features(self, values: Any) -> dict[str, Any] | None:
        import numpy as np

        if values is None:
            return None
        if not np.isfinite(values).all():
            raise VideoError(f"{self.path}: the {self.runner.cfg.backbone} features are not finite (NaN or inf)")
        return {self.runner.cfg.backbone: np.asarray(values, dtype=np.float32)}

    def _attrs(self, facts: Any) -> dict[str, Any]:
        entry = self.entry
        return {"label": int(entry.label), "class_name": entry.class_name, "split": entry.split,
                "fps": float(facts.fps or 0.0), "total_frames": int(facts.total_frames or 0),
                "source": str(self.path), "width": int(facts.width), "height": int(facts.height)}

    def reset(self) -> None:
        from hpcvid.storage.shards import PartWriter

        self.writer.discard()
        with self.writing():
            self.writer = PartWriter(self.parts / f"{self.key}.spool", self.options)
        self.features = _FeatureBatches(self.runner.extractor) if self.runner.extractor is not None else None

    def discard(self) -> None:
        self.writer.discard()


class _VideoRunner:
    """Runs every video of a shard (decode -> flow -> features -> part file), reusing finished parts; in this
    process, or with decoding and flow in ``workers`` processes (:class:`_Workers`)."""

    def __init__(self, config: Config, manifest: Manifest, roots: list[Path]) -> None:
        self.config = config
        self.cfg = config.extract
        self.manifest = manifest
        self.roots = roots
        self._extractor: Any = None
        self.feature_info: dict[str, Any] | None = None
        self.seconds = {"decode": 0.0, "flow": 0.0, "features": 0.0, "write": 0.0}
        self.chunks_by_workers = 0
        self.processed = 0
        self.processed_frames = 0
        self.reused = 0
        self.cores = task_cores(config)
        self.workers = worker_count(config)
        self.work_seconds = 0.0

    @property
    def extractor(self) -> Any:
        if self._extractor is None and self.cfg.backbone != "none":
            self._extractor = _TimedExtractor(feature_extractor(self.cfg.backbone, self.cfg.weights, self.cfg.device,
                                                                self.cfg.batch_size), self.seconds)
            self.feature_info = {**self._extractor.describe(), "random_init_seed": RANDOM_INIT_SEED}
            if self._extractor.random_init:
                log.warning("features come from a RANDOMLY INITIALISED %s (no --weights given): fine for tests, "
                            "meaningless for real results", self.cfg.backbone)
        return self._extractor

    def run_all(self, videos: Sequence[VideoEntry], parts: Path, spec: ShardSpec) -> list[dict[str, Any]]:
        """Every video of the shard, with a progress bar (videos, frames/s, ETA) and a progress file."""
        from tqdm import tqdm

        from hpcvid.launch.progress import write_progress

        todo = [position for position, entry in enumerate(videos) if not self._finished(entry, parts)]
        workers = min(self.workers, len(todo)) if _may_start_processes() else 0
        pool = _Workers(self.cfg, workers) if workers else None  # they start while the CNN loads
        try:
            _ = self.extractor  # a missing or bad weights file stops the shard here, not once per video
            outcomes: list[dict[str, Any] | None] = [None] * len(videos)
            started, wall = time.perf_counter(), time.time()
            write_progress(self.config.work, UNIT, spec, done=0, total=len(videos), started=wall)
            with tqdm(total=len(videos), desc=f"extract {spec.name}", unit="video", mininterval=1.0) as bar:
                def record(position: int, outcome: dict[str, Any]) -> None:
                    outcomes[position] = outcome
                    done = [o for o in outcomes if o is not None]
                    failed = sum(not o["ok"] for o in done)
                    write_progress(self.config.work, UNIT, spec, done=len(done), total=len(videos),
                                   failed=failed, started=wall)
                    elapsed = max(time.perf_counter() - started, 1e-9)
                    bar.set_postfix(frames_s=f"{self.processed_frames / elapsed:.1f}", failed=failed, refresh=False)
                    bar.update(1)

                for position, entry in enumerate(videos):
                    if position not in todo:
                        record(position, self._reuse(entry, parts))
                if pool is None:
                    for position in todo:
                        record(position, self.run_one(videos[position], parts))
                else:
                    with _threads_for_the_cnn(max(1, self.cores - workers)):
                        self._run_parallel(pool, videos, todo, parts, record)
            self.work_seconds = time.perf_counter() - started
        finally:
            if pool is not None:
                pool.close()
        return [o for o in outcomes if o is not None]

    # ------------------------------------------------------------------ the videos done before
    def _finished(self, entry: VideoEntry, parts: Path) -> bool:
        key = part_key(entry)
        return (parts / f"{key}.h5").is_file() or (parts / f"{key}.failed.json").is_file()

    def _reuse(self, entry: VideoEntry, parts: Path) -> dict[str, Any]:
        key = part_key(entry)
        self.reused += 1
        if (parts / f"{key}.h5").is_file():
            from hpcvid.storage.shards import read_video_file_summary

            return {"ok": True, "summary": read_video_file_summary(parts / f"{key}.h5")}
        return {"ok": False, "failure": read_json(parts / f"{key}.failed.json")}

    # ------------------------------------------------------------------ one process
    def run_one(self, entry: VideoEntry, parts: Path) -> dict[str, Any]:
        """One video here: produce and assemble in this process."""
        key = part_key(entry)
        path = video_path(self.roots, entry)
        attempts = _count_attempt(parts / f"{key}.attempts.json")
        assembly = None
        try:
            if attempts > self.cfg.max_attempts:
                raise _too_many_deaths(attempts)
            assembly = _Assembly(self, entry, path, parts)
            summary = self.extract(entry, path, assembly)
        except ResourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the shard
            if assembly is not None:
                assembly.discard()
            return self._failed(entry, path, parts, exc)
        finally:
            with contextlib.suppress(FileNotFoundError):
                (parts / f"{key}.attempts.json").unlink()
        return self._done(summary)

    def extract(self, entry: VideoEntry, path: Path, assembly: _Assembly) -> dict[str, Any]:
        """Stream one video through both halves here; its part's summary."""
        summary = None
        try:
            for message in produce(self.cfg, entry, path, want_frames=self.extractor is not None):
                summary = assembly.take(message)
        except ResourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - classified: the machine's, or the video's
            fault = _machine_fault(exc, assembly.parts.parent, entry, writing=False)
            if fault is not None:
                raise fault from exc
            raise
        return summary

    def _done(self, summary: dict[str, Any]) -> dict[str, Any]:
        self.processed += 1
        self.processed_frames += summary["frames"]
        return {"ok": True, "summary": summary}

    def _failed(self, entry: VideoEntry, path: Path, parts: Path, error: BaseException) -> dict[str, Any]:
        fault = _machine_fault(error, parts.parent, entry, writing=False)
        if fault is not None:
            raise fault from error
        failure = {"video": entry.id, "path": str(path), "reason": one_line_reason(error)}
        log.warning("video %s (%s) failed: %s", entry.id, path, failure["reason"])
        atomic_write_json(parts / f"{part_key(entry)}.failed.json", failure)  # a full disk: ResourceError
        return {"ok": False, "failure": failure}

    # ------------------------------------------------------------------ worker processes
    def _run_parallel(self, pool: "_Workers", videos: Sequence[VideoEntry], todo: list[int], parts: Path,
                      record: Any) -> None:
        """Hand the videos to the workers and assemble what they send back.

        Each worker holds up to WORKER_QUEUE videos: it starts the next as soon as it has sent the last chunk of
        one, while this process is still busy with that chunk. A video's attempt is counted when its worker
        starts it (the head of its queue). A worker that dies (a segfault in a native library, the OOM killer)
        leaves that video's attempts marker behind, exactly as the whole process dying would; its videos go back
        to the front of the line, on a new worker, and after ``extract.max_attempts`` starts it is listed as failed.
        """
        pending = list(todo)
        queues: dict[int, list[tuple[int, _Assembly]]] = {slot: [] for slot in range(pool.size)}
        try:
            while pending or any(queues.values()):
                self._fill(pool, videos, pending, queues, parts, record)
                busy = {slot for slot, queue in queues.items() if queue}
                for slot, message in pool.receive(busy) if busy else ():
                    self._take(pool, slot, message, videos, pending, queues, parts, record)
        except ResourceError:
            for queue in queues.values():  # the machine's fault: not a start that counts
                for position, assembly in queue:
                    assembly.discard()
                    self._forget_attempts(parts, part_key(videos[position]))
            raise

    def _fill(self, pool: "_Workers", videos: Sequence[VideoEntry], pending: list[int],
              queues: dict[int, list[tuple[int, "_Assembly"]]], parts: Path, record: Any) -> None:
        """Give every worker videos until its queue is full (a video over its attempts fails here)."""
        for slot, queue in queues.items():
            while pending and len(queue) < WORKER_QUEUE:
                position = pending.pop(0)
                entry = videos[position]
                path = video_path(self.roots, entry)
                try:
                    deaths = _attempts_so_far(parts / f"{part_key(entry)}.attempts.json")
                    if deaths >= self.cfg.max_attempts:
                        raise _too_many_deaths(deaths + 1)
                    assembly = _Assembly(self, entry, path, parts)
                except ResourceError:
                    raise
                except Exception as exc:  # noqa: BLE001 - this video fails, the shard goes on
                    self._forget_attempts(parts, part_key(entry))
                    record(position, self._failed(entry, path, parts, exc))
                    continue
                if not pool.send(slot, (entry, path, self.extractor is not None), idle=not queue):
                    assembly.discard()
                    pending.insert(0, position)     # the worker died on its current video: taken up below
                    break
                if not queue:
                    _count_attempt(parts / f"{part_key(entry)}.attempts.json")
                queue.append((position, assembly))

    def _take(self, pool: "_Workers", slot: int, message: Any, videos: Sequence[VideoEntry], pending: list[int],
              queues: dict[int, list[tuple[int, "_Assembly"]]], parts: Path, record: Any) -> None:
        """One message of a worker, for the video at the head of its queue (None: the worker died)."""
        queue = queues[slot]
        position, assembly = queue[0]
        entry = videos[position]
        if message is None:
            log.warning("the worker extracting %s died (exit code %s): trying it again", entry.id,
                        pool.exit_code(slot))
            self._requeue(pool, slot, queue, pending)
            return
        try:
            if isinstance(message, _Failed):
                raise message.error
            summary = assembly.take(message)
            if isinstance(message, _Chunk):
                pool.taken(slot, self._cnn_precision())
        except ResourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - this video fails, the shard goes on
            queue.pop(0)
            assembly.discard()
            self._forget_attempts(parts, part_key(entry))
            if not isinstance(message, _Failed):  # the worker may still be sending this video: replace it
                self._requeue(pool, slot, queue, pending)
            else:
                _count_next_start(parts, videos, queue)
            record(position, self._failed(entry, assembly.path, parts, exc))
            return
        if summary is not None:
            queue.pop(0)
            self._forget_attempts(parts, part_key(entry))
            _count_next_start(parts, videos, queue)
            record(position, self._done(summary))

    def _cnn_precision(self) -> str | None:
        """The precision this process's CNN decided on, when it runs on the CPU (workers may then compute the
        features of a chunk with the same network); None before it decided, or on a GPU."""
        extractor = self._extractor
        if extractor is None or extractor.device.type != "cpu":
            return None
        return extractor.precision

    @staticmethod
    def _requeue(pool: "_Workers", slot: int, queue: list[tuple[int, "_Assembly"]], pending: list[int]) -> None:
        """Replace the worker of ``slot``; its videos go back to the front of the line, in order."""
        for _, assembly in queue:
            assembly.discard()
        pending[:0] = [position for position, _ in queue]
        queue.clear()
        pool.restart(slot)

    @staticmethod
    def _forget_attempts(parts: Path, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (parts / f"{key}.attempts.json").unlink()


@contextlib.contextmanager
def _writing(parts: Path, entry: VideoEntry) -> Iterator[None]:
    """Any error of the machine while writing a video's spool or part (a full disk, EACCES, EIO) stops the shard."""
    try:
        yield
    except ResourceError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified: the machine's, or raised as it is
        fault = _machine_fault(exc, parts.parent, entry, writing=True)
        if fault is not None:
            raise fault from exc
        raise


def _too_many_deaths(attempts: int) -> VideoError:
    return VideoError(f"the extracting process died {attempts - 1} times while on this video (a crash in a "
                      "decoder/flow library, or killed for memory?); skipped")


class _TimedExtractor:
    """The feature extractor, its time counted into the stage's ``features`` seconds."""

    def __init__(self, extractor: Any, seconds: dict[str, float]) -> None:
        self._extractor, self._seconds = extractor, seconds

    def extract(self, frames: Any) -> Any:
        began = time.perf_counter()
        try:
            return self._extractor.extract(frames)
        finally:
            self._seconds["features"] += time.perf_counter() - began

    def __getattr__(self, name: str) -> Any:
        return getattr(self._extractor, name)


# ------------------------------------------------------------------------------------ the workers
def task_cores(config: Config) -> int:
    """The cores this shard's task may use: ``launch.cpus_per_task`` under SLURM, else this process's
    affinity mask, capped by OMP_NUM_THREADS when it is set (``hpcvid run --jobs N`` gives each of its N
    processes its share of the cores that way)."""
    import os

    from hpcvid.launch.executors import usable_cores

    cores = usable_cores()
    if os.environ.get("SLURM_JOB_ID"):
        return max(1, min(cores, config.launch.for_stage("extract").cpus_per_task))
    threads = os.environ.get("OMP_NUM_THREADS", "")
    return max(1, min(cores, int(threads))) if threads.isdigit() and int(threads) > 0 else max(1, cores)


def worker_count(config: Config) -> int:
    """Decode-and-flow worker processes of a shard: ``extract.workers``, or with -1 (the default) the task's
    cores less the one the CNN's process keeps."""
    return config.extract.workers if config.extract.workers >= 0 else task_cores(config) - 1


def _may_start_processes() -> bool:
    """A daemonic process (a multiprocessing pool's worker) may not have children: extract in it alone.

    A worker being started imports the parent's main script; one whose body is not guarded by ``if __name__
    == '__main__':`` would extract the shard again inside the worker. That is refused here, so the worker
    dies before it is ready and the parent says why.
    """
    import multiprocessing

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError("the extract stage was started while a worker process was starting: guard the script's "
                          "body with `if __name__ == '__main__':`")
    return not multiprocessing.current_process().daemon


@contextlib.contextmanager
def _threads_for_the_cnn(threads: int) -> Iterator[None]:
    """The CNN's process keeps ``threads`` CPU threads while the workers use the other cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(min(before, threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _worker_main(conn: Any, cfg: Any, shared: Any = None) -> None:
    """A worker process: take a video (entry, path, want_frames), send its chunks back, until told to stop.

    One CPU thread for OpenCV and torch (the cores are shared out as processes); SIGINT is left to the
    parent, which stops the workers itself. An exception is sent back as the video's failure, as itself when
    it pickles (the parent tells a fault of the machine from a bad video by it), else as its one line.
    ``shared`` is what the parent tells the worker's :class:`_HelpingCNN`.
    """
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    import cv2

    cv2.setNumThreads(1)
    helper = _HelpingCNN(cfg, shared) if shared is not None else None
    conn.send(_READY)
    if helper is not None:
        helper.prepare()     # beside the CNN's process loading its own, before the first video
    with _Sender(conn) as sender:
        while True:
            try:
                task = conn.recv()
            except EOFError:
                return
            if task is None:
                return
            entry, path, want_frames = task
            try:
                for message in produce(cfg, entry, path, want_frames, helper):
                    sender.send(message)
                    if helper is not None and isinstance(message, _Chunk):
                        helper.sent += 1
            except Exception as exc:  # noqa: BLE001 - sent to the parent, which decides what it is
                sender.send(_Failed(_portable(exc)))


class _Sender:
    """A worker's messages, sent in order by a thread of their own, so the worker goes on with the next chunk
    while the CNN's process has not yet read the last one (a message larger than the pipe's buffer blocks
    its sender until it is read). One message waits beside the one being sent: with the chunk in hand, a
    worker holds at most three chunks."""

    def __init__(self, conn: Any) -> None:
        import queue
        import threading

        self.conn = conn
        self.queue: Any = queue.Queue(maxsize=1)
        self.thread = threading.Thread(target=self._run, name="hpcvid-extract-sender", daemon=True)
        self.broken = False

    def __enter__(self) -> "_Sender":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.queue.put(None)
        self.thread.join()

    def send(self, message: Any) -> None:
        if self.broken:           # the parent is gone: nothing to send to, the worker ends
            raise SystemExit(0)
        self.queue.put(message)

    def _run(self) -> None:
        while (message := self.queue.get()) is not None:
            try:
                self.conn.send(message)
            except OSError:
                self.broken = True
                while self.queue.get() is not None:
                    pass
                return


def _portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (the parent needs its type and errno), else a RuntimeError of its line."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any unpicklable exception
        return RuntimeError(one_line_reason(error))


WORKER_QUEUE = 2
"""Videos a worker holds: the one it works on and the next, so that it never waits for this process."""

_TAKEN, _PRECISION = 0, 1
"""What a worker's shared array holds: the chunks of it that the CNN's process has taken, and the code
(:data:`_PRECISIONS`) of the precision that process's CNN decided on (0: not decided, or not on the CPU)."""
_PRECISIONS = (None, "fp32", "bf16", "fp16")


class _HelpingCNN:
    """In a worker: the CNN's work on a chunk, done here when the CNN's process is behind.

    With the CNN on the CPU, its process is often the slower half of a task (ResNet-50 at 224 px takes ~40
    ms a frame on one core, DIS flow ~1 ms): a worker that only decodes and computes flow then waits on a
    full pipe much of the time. When the CNN's process has more of this worker's chunks to take than the
    one it works on (:data:`_HELP_BEHIND`), the worker computes the features of the next one itself, with
    the same network (the same weights file, or the same seeded random one), batch size, precision and one
    thread, so the features are the same whichever process computed them. Only a chunk whose frames are
    whole CNN batches of the video is taken on (its first frame at a multiple of the batch size, its length
    too): a batch is never split between the two processes, so no batch depends on where the chunks fall.
    """

    def __init__(self, cfg: Any, shared: Any) -> None:
        self.cfg, self.shared = cfg, shared
        self.sent = 0
        self._extractor: Any = None

    def prepare(self) -> None:
        """Load the network now (imports, weights, folding: seconds) when the CNN runs on the CPU, so that the
        first chunk this worker takes on does not keep the CNN's process waiting that long. Not when chunks
        are not whole batches (``chunk_frames`` not a multiple of ``batch_size``): then no chunk but perhaps
        a video's last could ever be taken on, and the load would cost every worker its start for nothing."""
        import torch

        from hpcvid.learn.backbones import pick_device

        cfg = self.cfg
        if cfg.backbone == "none" or cfg.chunk_frames % cfg.batch_size or pick_device(cfg.device).type != "cpu":
            return
        torch.set_num_threads(1)
        try:
            self._extractor = feature_extractor(self.cfg.backbone, self.cfg.weights, "cpu", self.cfg.batch_size)
        except Exception as error:  # noqa: BLE001 - the CNN's process meets it too and stops the shard with it
            log.info("extract worker: the CNN is not loaded here (%s); it decodes and computes flow only", error)

    def features(self, frames: Any, first: int) -> Any:
        """The features of ``frames`` (kept frames ``first``... of the video), or None to leave them to the CNN's
        process (it keeps up, it has not decided its precision, or the chunk is not whole batches)."""
        precision = _PRECISIONS[self.shared[_PRECISION]]
        size = self.cfg.batch_size
        if (self._extractor is None or precision is None or first % size or len(frames) % size
                or self.sent - self.shared[_TAKEN] < _HELP_BEHIND):
            return None
        if self._extractor.precision is None:
            self._extractor.use_precision(precision, "the one the CNN's process decided on")
        return self._extractor.extract(frames)


_HELP_BEHIND = 2
"""Chunks handed to the sender but not yet taken by the CNN's process from which a worker computes the next
chunk's features itself: the one that process works on and one more waiting, so it stays busy meanwhile."""

_READY = "ready"
"""A worker's first message: it started (a worker that dies before it cannot start at all)."""

_WORKER_TARGET = _worker_main
"""The function each worker process runs (tests put a wrapper here that dies on a chosen video)."""


class _Workers:
    """Decode-and-flow worker processes, each with its own pipe to this process.

    A pipe per worker rather than one shared queue: a worker killed in the middle of a message (SIGKILL, a
    segfault) then damages only its own pipe, which this process reads as the worker's death, instead of
    a queue every worker shares. A worker holds at most a chunk in hand, one waiting to be sent and one in
    the pipe (:class:`_Sender`): memory stays bounded by the chunk. Started with
    ``spawn``: no CUDA context, OpenMP pool or HDF5 handle of this process is inherited.
    """

    def __init__(self, cfg: Any, count: int) -> None:
        import multiprocessing

        self.context = multiprocessing.get_context("spawn")
        self.cfg = cfg
        self.target = _WORKER_TARGET
        self.slots: list[tuple[Any, Any]] = []
        self.shared: dict[int, Any] = {}
        self.precision = 0
        self.ready: set[int] = set()
        for slot in range(count):
            self.slots.append(self._start(slot))

    def _start(self, slot: int) -> tuple[Any, Any]:
        parent, child = self.context.Pipe(duplex=True)
        shared = self.context.RawArray("i", 2)
        shared[_PRECISION] = self.precision
        process = self.context.Process(target=self.target, args=(child, self.cfg, shared), daemon=True,
                                       name="hpcvid-extract-worker")
        process.start()
        child.close()
        self.shared[slot] = shared
        return process, parent

    def taken(self, slot: int, precision: str | None) -> None:
        """The CNN's process took a chunk of ``slot`` (its CNN on the CPU decided on ``precision``, or None)."""
        if precision is not None and not self.precision:
            self.precision = _PRECISIONS.index(precision)
            for shared in self.shared.values():
                shared[_PRECISION] = self.precision
        self.shared[slot][_TAKEN] += 1

    @property
    def size(self) -> int:
        return len(self.slots)

    def send(self, slot: int, task: Any, *, idle: bool) -> bool:
        """Give a worker one more video. An idle worker that died is replaced first. A busy one that died is
        left as it is (False): its death belongs to the video it was working on, which :meth:`receive`
        reports, and a replacement here would start on this video while that one is still awaited."""
        if not self.slots[slot][0].is_alive():
            if not idle:
                return False
            self.restart(slot)
        try:
            self.slots[slot][1].send(task)
        except OSError:
            if not idle:
                return False
            self.restart(slot)
            self.slots[slot][1].send(task)
        return True

    def receive(self, busy: set[int]) -> list[tuple[int, Any]]:
        """Wait until a busy worker sends something or dies: [(slot, message, or None for a death)]."""
        from multiprocessing.connection import wait

        by_handle = {}
        for slot in busy:
            process, conn = self.slots[slot]
            by_handle[conn] = slot
            by_handle[process.sentinel] = slot
        out = []
        while not out:
            for slot in sorted({by_handle[handle] for handle in wait(list(by_handle))}):
                message = self._recv(slot)
                if message == _READY:
                    self.ready.add(slot)
                elif message is None and slot not in self.ready:
                    raise ResourceError(f"an extract worker process could not start (exit code "
                                        f"{self.exit_code(slot)}; its error is above): a script that calls the "
                                        "stage must guard its body with `if __name__ == '__main__':`; or set "
                                        "extract.workers = 0 to extract in one process")
                else:
                    out.append((slot, message))
        return out

    def _recv(self, slot: int) -> Any:
        """The next message of ``slot``, or None when it died (a pipe cut mid-message reads as a death too)."""
        process, conn = self.slots[slot]
        try:
            if conn.poll():
                return conn.recv()
        except Exception:  # noqa: BLE001 - EOFError, a truncated pickle: the worker is gone
            pass
        return None

    def exit_code(self, slot: int) -> Any:
        process = self.slots[slot][0]
        process.join(timeout=5)
        return process.exitcode

    def restart(self, slot: int) -> None:
        self._stop(*self.slots[slot])
        self.ready.discard(slot)
        self.slots[slot] = self._start(slot)

    @staticmethod
    def _stop(process: Any, conn: Any) -> None:
        with contextlib.suppress(OSError):
            conn.close()
        if process.is_alive():
            process.kill()
        process.join(timeout=10)

    def close(self) -> None:
        """Ask every worker to stop, then stop those that do not (one busy sending a chunk nobody takes)."""
        for process, conn in self.slots:
            with contextlib.suppress(OSError, ValueError):
                conn.send(None)
        deadline = time.monotonic() + 5
        for process, conn in self.slots:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            self._stop(process, conn)
        self.slots = []


_EXTRACTORS: dict[tuple, Any] = {}


def feature_extractor(backbone: str, weights: str, device: str, batch_size: int) -> Any:
    """One FeatureExtractor per settings and process: shards run in one process share the loaded model."""
    key = (backbone, weights, device, batch_size)
    if key not in _EXTRACTORS:
        import torch

        from hpcvid.learn.extractor import FeatureExtractor

        # A random network must be the SAME network in every process: a resumed shard, or shards run on
        # different nodes, would otherwise mix features of different random networks.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_INIT_SEED)
            _EXTRACTORS[key] = FeatureExtractor(backbone, weights, device, batch_size)
    return _EXTRACTORS[key]


def _attempts_so_far(marker: Path) -> int:
    """How many starts on a video its attempts marker counts (0 without a marker)."""
    return read_json(marker)["attempts"] if marker.is_file() else 0


def _count_next_start(parts: Path, videos: Sequence[VideoEntry], queue: list[tuple[int, Any]]) -> None:
    """A worker that ended one video has started the next it held (the head of its queue, if any)."""
    if queue:
        _count_attempt(parts / f"{part_key(videos[queue[0][0]])}.attempts.json")


def _count_attempt(marker: Path) -> int:
    """Count one more start on a video. The marker outlives the process only when it dies on that video
    (SIGKILL, walltime, a segfault in a native library, the OOM killer), so the count says how often that
    happened; a video that keeps killing its process is eventually listed as failed instead of looping."""
    attempts = _attempts_so_far(marker) + 1
    atomic_write_json(marker, {"attempts": attempts})
    return attempts


def flow_params(cfg: Any) -> dict[str, Any]:
    """The flow settings of ExtractConfig as keyword arguments of :func:`hpcvid.media.flow.compute_flow`."""
    running = {"device": cfg.device, "batch_size": cfg.flow_batch_size}
    if cfg.flow == "dis":
        return {"preset": cfg.dis_preset}
    if cfg.flow in ("tvl1", "tvl1_torch"):
        tvl1 = {"nscales": cfg.tvl1_scales, "warps": cfg.tvl1_warps, "scale_step": cfg.tvl1_scale_step,
                "tau": cfg.tvl1_tau, "lambda_": cfg.tvl1_lambda, "theta": cfg.tvl1_theta, "epsilon": cfg.tvl1_epsilon,
                "inner_iterations": cfg.tvl1_inner_iterations, "outer_iterations": cfg.tvl1_outer_iterations,
                "median_filtering": cfg.tvl1_median_filtering}
        return {**tvl1, **running, "compile": cfg.tvl1_compile} if cfg.flow == "tvl1_torch" else tvl1
    if cfg.flow == "raft":
        return {"weights": cfg.flow_weights, "model": cfg.raft_model, "iterations": cfg.raft_iterations, **running}
    return {}


def video_path(roots: Sequence[Path], entry: VideoEntry) -> Path:
    """The video's file: its manifest path below its root (the dataset's, or one of dataset.extra_roots)."""
    if entry.root >= len(roots):
        raise VideoError(f"its root #{entry.root} of dataset.extra_roots is not configured: give the job file "
                         "that indexed this work folder")
    return roots[entry.root] / entry.path


def _machine_fault(error: BaseException, folder: Path, entry: VideoEntry, writing: bool) -> ResourceError | None:
    """The machine's fault behind a video's error, if it is one: then the shard stops and nothing is marked
    failed. Reading a video that the system forbids (EACCES) is the video's problem; writing is never."""
    fault = machine_fault(error, folder, f"extracting {entry.id}")
    if fault is None:
        return None
    if not writing and isinstance(error, OSError) and error.errno in (errno.EACCES, errno.EPERM):
        return None
    return fault


def _check_room(folder: Path, needed: int, entry: VideoEntry) -> None:
    """Stop before a part that cannot fit is written: HDF5 interrupted by a full disk can leave the process
    in a state that crashes it later, and the disk is shared with other jobs that may have filled it."""
    import shutil as _shutil

    free = _shutil.disk_usage(folder).free
    if free < needed:
        raise ResourceError(f"{folder}: no space is left while extracting {entry.id} ({free / 2**20:.1f} MiB free, "
                            f"about {needed / 2**20:.1f} MiB needed): free space or use a larger file system "
                            "(--work), then rerun")


def one_line_reason(exc: BaseException) -> str:
    """A failure as one short line: the project's own errors as they are, others with their type."""
    text = " ".join(str(exc).split()) or "no message"
    if not isinstance(exc, (VideoError, StoreError)):
        text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 3] + "..."


def _make_record(config: Config, spec: ShardSpec, videos: Sequence[VideoEntry],
                 outcomes: Sequence[dict[str, Any]], runner: _VideoRunner, started: float) -> dict[str, Any]:
    from hpcvid.version import code_version

    written = [o["summary"] for o in outcomes if o["ok"]]
    failed = [o["failure"] for o in outcomes if not o["ok"]]
    seconds = time.time() - started
    warnings = []
    if runner.extractor is not None:  # described after use: the precision is decided on the first batch
        runner.feature_info = {**runner.extractor.describe(), "random_init_seed": RANDOM_INIT_SEED}
    if runner.extractor is not None and runner.extractor.random_init:
        warnings.append(f"features come from a RANDOMLY INITIALISED {config.extract.backbone} (no --weights): "
                        "fine for tests and the demo, meaningless for real results")
    return {
        "shard": spec.name, "index": spec.index, "count": spec.count,
        "n_videos": len(written), "n_failed": len(failed), "n_frames": sum(v["frames"] for v in written),
        "videos": written, "failed": failed,
        "random_init": bool(warnings), "warnings": warnings,
        "features": runner.feature_info,
        "config": config.to_dict(), "code_version": code_version(), "host": socket.gethostname(),
        "timings": {
            "seconds": round(seconds, 3),
            "videos_processed": runner.processed, "videos_resumed": runner.reused,
            "frames_processed": runner.processed_frames,
            "frames_per_s": round(runner.processed_frames / max(sum(runner.seconds.values()), 1e-9), 2),
            "stage_seconds": {k: round(v, 3) for k, v in runner.seconds.items()},
            "work_seconds": round(runner.work_seconds, 3), "cores": runner.cores, "workers": runner.workers,
            "chunks_featured_by_workers": runner.chunks_by_workers,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "manifest_videos": len(videos),
    }
