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
import hashlib
import json
import logging
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Sequence

from hpcvid.config import Config
from hpcvid.errors import PartialFailure, StoreError, VideoError
from hpcvid.fileio import atomic_write_json, read_json, write_record
from hpcvid.storage.manifest import Manifest, VideoEntry, load_manifest, manifest_path
from hpcvid.launch.sharding import ShardSpec, all_shards, pending_shards, select

log = logging.getLogger(__name__)

HELP = "decode, optical flow and CNN features per shard into WORK/extract/shard-*.h5"
RECORD_SCHEMA_VERSION = 1
EXTRACT_DIR = "extract"
REASON_MAX = 300
RANDOM_INIT_SEED = 0
"""Seed of the randomly initialised backbone (no --weights): the same network in every process."""


# ------------------------------------------------------------------------------------------ the CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", metavar="DIR", help="dataset folder; overrides the job file's dataset.root")
    parser.add_argument("--shards", type=int, metavar="N", help="number of shards (default: extract.shards)")
    parser.add_argument("--shard", type=int, metavar="I", help="run only shard I (0-based); default: all")
    parser.add_argument("--force", action="store_true", help="redo shards whose record exists")
    parser.add_argument("--weights", metavar="PATH", help="local backbone weights (.pt/.pth state dict)")
    parser.add_argument("--backbone", choices=("resnet18", "googlenet", "none"), help="CNN for features")
    parser.add_argument("--flow", choices=("farneback", "dis", "tvl1", "none"), help="optical flow algorithm")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "extract.shards": args.shards,
        "extract.weights": args.weights,
        "extract.backbone": args.backbone,
        "extract.flow": args.flow,
        "dataset.root": args.dataset,
    }


def plan(config: Config, args: argparse.Namespace) -> list[ShardSpec]:
    """The shards to run now: all (or --shard I), minus those whose record exists unless --force."""
    ensure_manifest(config)
    if config.extract.backbone != "none" and config.extract.weights:
        from hpcvid.learn.backbones import require_weights_file

        require_weights_file(config.extract.weights, config.extract.backbone)
    return pending_shards(config.extract.shards, getattr(args, "shard", None), bool(getattr(args, "force", False)),
                          lambda spec: record_path(config, spec), "extract")


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print what was done; exit 0, or raise PartialFailure (exit 3) when videos failed in any finished shard."""
    count = config.extract.shards
    for record in records:
        timing = record.get("timings", {})
        print(f"shard {record['shard']}: {record['n_videos']} videos, {record['n_frames']} frames, "
              f"{record['n_failed']} failed, {timing.get('seconds', 0):.1f} s "
              f"({timing.get('frames_per_s', 0):.1f} frames/s)")
    done = [read_json(p) for spec in all_shards(count) if (p := record_path(config, spec)).is_file()]
    print(f"extract: {len(done)} of {count} shards done in {extract_dir(config)}"
          + ("" if records else " (nothing to do)"))
    for warning in sorted({w for record in done for w in record.get("warnings", ())}):
        print(f"warning: {warning}")
    failed = [(record, failure) for record in done for failure in record["failed"]]
    if failed:
        where = sorted({str(extract_dir(config) / f"shard-{r['shard']}.json") for r, _ in failed})
        raise PartialFailure(f"{len(failed)} video(s) failed; the list (video, path, reason) is under "
                             f"'failed' in {', '.join(where)}")
    return 0


# ------------------------------------------------------------------------------------------ the files
def extract_dir(config: Config) -> Path:
    return config.work_dir / EXTRACT_DIR


def shard_path(config: Config, spec: ShardSpec) -> Path:
    return extract_dir(config) / f"shard-{spec.name}.h5"


def record_path(config: Config, spec: ShardSpec) -> Path:
    return extract_dir(config) / f"shard-{spec.name}.json"


def parts_dir(config: Config, spec: ShardSpec) -> Path:
    return extract_dir(config) / f"shard-{spec.name}.parts"


def shard_done(config: Config, spec: ShardSpec) -> bool:
    """A shard is done exactly when its record exists (it is written last)."""
    return record_path(config, spec).is_file()


def part_key(entry: VideoEntry) -> str:
    """The name of a video's part files: its id plus the file's size and mtime, so that a video replaced
    between an interrupted run and its resume is extracted again rather than taken from the old part."""
    identity = f"{entry.id}|{entry.size}|{entry.mtime!r}"
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()[:24]


def ensure_manifest(config: Config) -> Manifest:
    """Load WORK/manifest.json; when it is missing and a dataset is configured, index it first."""
    if not manifest_path(config.work_dir).is_file() and config.dataset.root:
        from hpcvid.stages.index import index_dataset

        log.info("%s is missing: indexing %s first", manifest_path(config.work_dir), config.dataset.root)
        index_dataset(config)
    return load_manifest(config.work_dir)


# ----------------------------------------------------------------------------------------- the stage
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Extract shard ``spec`` and return its record. Resumes from finished parts; --force starts over."""
    record_file, shard_file, parts = record_path(config, spec), shard_path(config, spec), parts_dir(config, spec)
    if spec.force and not _requeued():
        _remove_shard_outputs(record_file, shard_file, parts)
    elif record_file.is_file():
        shutil.rmtree(parts, ignore_errors=True)  # a kill after the record, before the clean-up
        return read_json(record_file)
    started = time.time()
    manifest = ensure_manifest(config)
    videos = select(manifest.videos, spec, key=lambda v: v.id)
    _prepare_parts(config, parts, shard_file, record_file)
    runner = _VideoRunner(config, manifest)
    outcomes = runner.run_all(videos, parts, spec)
    ok_parts = [parts / f"{part_key(v)}.h5" for v, outcome in zip(videos, outcomes) if outcome["ok"]]
    from hpcvid.storage.shards import KIND_EXTRACT, assemble_shard

    meta = {"shard": spec.name, "config": config.extract.__dict__, "dataset": manifest.dataset}
    assemble_shard(shard_file, ok_parts, kind=KIND_EXTRACT, meta=meta)
    fields = _make_record(config, spec, videos, outcomes, runner, started)
    record = write_record(record_file, fields, kind="hpcvid.extract.record", schema_version=RECORD_SCHEMA_VERSION,
                          describes=shard_file)
    shutil.rmtree(parts, ignore_errors=True)
    return record  # as read back: exactly what a later call (or another process) will see


def _requeued() -> bool:
    """True in a SLURM job that was requeued (walltime, preemption): --force then means the first start's
    clean slate, not a new one, or a long shard would start over at every requeue and never finish."""
    import os

    return os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


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
    settings.pop("shards", None)
    settings.pop("batch_size", None)
    settings.pop("device", None)
    settings.pop("max_attempts", None)
    return json.loads(json.dumps(settings, sort_keys=True))


def _store_schema() -> int:
    from hpcvid.storage.shards import SCHEMA_VERSION

    return SCHEMA_VERSION


# --------------------------------------------------------------------------------------- per video
class _VideoRunner:
    """Runs decode -> flow -> features -> part file for each video, reusing finished parts."""

    def __init__(self, config: Config, manifest: Manifest) -> None:
        self.config = config
        self.cfg = config.extract
        self.manifest = manifest
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
        write_progress(self.config.work, "extract", spec, done=0, total=len(videos), started=wall)
        with tqdm(total=len(videos), desc=f"extract {spec.name}", unit="video", mininterval=1.0) as bar:
            for entry in videos:
                outcomes.append(self.run_one(entry, parts))
                failed = sum(not o["ok"] for o in outcomes)
                write_progress(self.config.work, "extract", spec, done=len(outcomes), total=len(videos),
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
        path = video_path(self.manifest, entry)
        attempts = _count_attempt(parts / f"{key}.attempts.json")
        try:
            if attempts > self.cfg.max_attempts:
                raise VideoError(f"the extracting process died {attempts - 1} times while on this video (a crash "
                                 "in a decoder/flow library, or killed for memory?); skipped")
            video = self.compute(entry, path)
            began = time.perf_counter()
            from hpcvid.storage.shards import StorageOptions, write_video_file

            summary = write_video_file(part_file, video, StorageOptions.from_config(self.cfg))
            self.seconds["write"] += time.perf_counter() - began
        except Exception as exc:  # noqa: BLE001 - one bad video must not stop the shard (MemoryError too)
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
            raise VideoError(f"{path} does not exist (moved or deleted since indexing?)")
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
    if cfg.flow == "dis":
        return {"preset": cfg.dis_preset}
    if cfg.flow == "tvl1":
        return {"nscales": cfg.tvl1_scales, "warps": cfg.tvl1_warps}
    return {}


def video_path(manifest: Manifest, entry: VideoEntry) -> Path:
    """The video's file: the manifest path, taken below the dataset root when relative."""
    path = Path(entry.path)
    if not path.is_absolute():
        root = manifest.dataset.get("root") if isinstance(manifest.dataset, dict) else None
        if root:
            path = Path(root) / path
    return path


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
