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
from pathlib import Path
from typing import Any, Sequence

from hpcvid.config import Config
from hpcvid.errors import PartialFailure, ResourceError, StoreError, VideoError, machine_fault
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

    meta = {"shard": spec.name, "config": config.extract.__dict__, "dataset": manifest.dataset}
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
        trial = replace(config, work=scratch, **{"extract.shards": 1, "dataset.root": str(roots[0])})
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
        if not settings_file.is_file() or read_json(settings_file) != settings:
            log.info("%s was made with other settings: starting this shard over", parts)
            shutil.rmtree(parts, ignore_errors=True)
    parts.mkdir(parents=True, exist_ok=True)
    if not settings_file.is_file():
        atomic_write_json(settings_file, settings)


def _settings_fingerprint(config: Config) -> dict[str, Any]:
    """The settings that change a video's stored contents (not the shard count: contents do not depend on it)."""
    settings = dict(config.extract.__dict__)
    for name in ("shards", "batch_size", "flow_batch_size", "tvl1_compile", "device", "max_attempts"):
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
class _VideoRunner:
    """Runs decode -> flow -> features -> part file for each video, reusing finished parts."""

    def __init__(self, config: Config, manifest: Manifest, roots: list[Path]) -> None:
        self.config = config
        self.cfg = config.extract
        self.manifest = manifest
        self.roots = roots
        self._extractor: Any = None
        self.feature_info: dict[str, Any] | None = None
        self.seconds = {"decode": 0.0, "flow": 0.0, "features": 0.0, "write": 0.0}
        self.processed = 0
        self.processed_frames = 0
        self.reused = 0

    @property
    def extractor(self) -> Any:
        if self._extractor is None and self.cfg.backbone != "none":
            self._extractor = feature_extractor(self.cfg.backbone, self.cfg.weights, self.cfg.device,
                                                self.cfg.batch_size)
            self.feature_info = {**self._extractor.describe(), "random_init_seed": RANDOM_INIT_SEED}
            if self._extractor.random_init:
                log.warning("features come from a RANDOMLY INITIALISED %s (no --weights given): fine for tests, "
                            "meaningless for real results", self.cfg.backbone)
        return self._extractor

    def run_all(self, videos: Sequence[VideoEntry], parts: Path, spec: ShardSpec) -> list[dict[str, Any]]:
        """Every video of the shard, with a progress bar (videos, frames/s, ETA) and a progress file."""
        from tqdm import tqdm

        from hpcvid.launch.progress import write_progress

        _ = self.extractor  # a missing or bad weights file stops the shard here, not once per video
        outcomes: list[dict[str, Any]] = []
        started, wall = time.perf_counter(), time.time()
        write_progress(self.config.work, UNIT, spec, done=0, total=len(videos), started=wall)
        with tqdm(total=len(videos), desc=f"extract {spec.name}", unit="video", mininterval=1.0) as bar:
            for entry in videos:
                outcomes.append(self.run_one(entry, parts))
                failed = sum(not o["ok"] for o in outcomes)
                write_progress(self.config.work, UNIT, spec, done=len(outcomes), total=len(videos),
                               failed=failed, started=wall)
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.set_postfix(frames_s=f"{self.processed_frames / elapsed:.1f}", failed=failed, refresh=False)
                bar.update(1)
        return outcomes

    def run_one(self, entry: VideoEntry, parts: Path) -> dict[str, Any]:
        key = part_key(entry)
        part_file, failed_file = parts / f"{key}.h5", parts / f"{key}.failed.json"
        if part_file.is_file():
            self.reused += 1
            from hpcvid.storage.shards import read_video_file_summary

            return {"ok": True, "summary": read_video_file_summary(part_file)}
        if failed_file.is_file():
            self.reused += 1
            return {"ok": False, "failure": read_json(failed_file)}
        path = video_path(self.roots, entry)
        attempts = _count_attempt(parts / f"{key}.attempts.json")
        writing = False
        try:
            if attempts > self.cfg.max_attempts:
                raise VideoError(f"the extracting process died {attempts - 1} times while on this video (a crash "
                                 "in a decoder/flow library, or killed for memory?); skipped")
            video = self.compute(entry, path)
            began = time.perf_counter()
            from hpcvid.storage.shards import StorageOptions, write_video_file

            writing = True
            _check_room(parts, estimate_bytes(self.config, [entry]) // 2, entry)
            summary = write_video_file(part_file, video, StorageOptions.from_config(self.cfg))
            self.seconds["write"] += time.perf_counter() - began
        except ResourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the shard
            fault = _machine_fault(exc, parts.parent, entry, writing)
            if fault is not None:
                raise fault from exc
            failure = {"video": entry.id, "path": str(path), "reason": one_line_reason(exc)}
            log.warning("video %s (%s) failed: %s", entry.id, path, failure["reason"])
            atomic_write_json(failed_file, failure)
            return {"ok": False, "failure": failure}
        finally:
            with contextlib.suppress(FileNotFoundError):
                (parts / f"{key}.attempts.json").unlink()
        self.processed += 1
        self.processed_frames += summary["frames"]
        return {"ok": True, "summary": summary}

    def compute(self, entry: VideoEntry, path: Path) -> Any:
        """Decode, flow and features of one video -> VideoData (raises VideoError on bad input)."""
        import numpy as np

        from hpcvid.media.decode import read_video
        from hpcvid.storage.shards import VideoData

        if entry.probe_error:
            raise VideoError(f"indexing could not read it: {entry.probe_error}")
        if not path.is_file():
            raise VideoError(f"{path} does not exist (moved or deleted since indexing? a moved dataset: "
                             "pass --dataset NEW_ROOT)")
        size = path.stat().st_size
        if size != entry.size:
            raise VideoError(f"{path} is not the video that was indexed ({size} bytes, indexed {entry.size}): "
                             "re-index with `hpcvid index` if the dataset changed")
        began = time.perf_counter()
        decoded = read_video(path, self.cfg)
        frames = np.asarray(decoded.frames)
        self.seconds["decode"] += time.perf_counter() - began
        if frames.ndim != 4 or len(frames) == 0:
            raise VideoError(f"{path}: no video frames could be decoded")
        flow = None
        if self.cfg.flow != "none":
            began = time.perf_counter()
            if len(frames) < 2:
                flow = np.zeros((0,) + frames.shape[1:3] + (2,), dtype=np.float32)
            else:
                from hpcvid.media.flow import compute_flow

                flow = compute_flow(frames, self.cfg.flow, **flow_params(self.cfg))
            self.seconds["flow"] += time.perf_counter() - began
        features = {}
        if self.extractor is not None:
            began = time.perf_counter()
            values = np.asarray(self.extractor.extract(frames), dtype=np.float32)
            self.seconds["features"] += time.perf_counter() - began
            if not np.isfinite(values).all():
                raise VideoError(f"{path}: the {self.cfg.backbone} features are not finite (NaN or inf)")
            features[self.cfg.backbone] = values
        attrs = {
            "label": int(entry.label), "class_name": entry.class_name, "split": entry.split,
            "fps": float(decoded.fps or 0.0), "total_frames": int(decoded.total_frames or 0),
            "source": str(path), "width": int(decoded.width), "height": int(decoded.height),
        }
        return VideoData(entry.id, attrs, np.asarray(decoded.indices, dtype=np.int64), frames, flow, features)


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


def _count_attempt(marker: Path) -> int:
    """Count one more start on a video. The marker outlives the process only when it dies on that video
    (SIGKILL, walltime, a segfault in a native library, the OOM killer), so the count says how often that
    happened; a video that keeps killing its process is eventually listed as failed instead of looping."""
    attempts = (read_json(marker)["attempts"] if marker.is_file() else 0) + 1
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
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "manifest_videos": len(videos),
    }
