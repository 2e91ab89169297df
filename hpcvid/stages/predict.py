"""The ``predict`` stage: a trained run's best classes for videos of one's own, and a timeline over each.

Run manual::

    hpcvid predict --run WORK/runs/lstm clips/ other.mp4 [--top 5] [--out predictions.csv] [--timeline]
    hpcvid submit predict --run WORK/runs/lstm clips/ --shards 8       # a large folder, on SLURM
    hpcvid run predict --run WORK/runs/lstm clips/ --shards 8 --jobs 2  # the same, on this machine

The videos are decoded, their flow and features computed by the extract stage's own code with the run's
own extraction settings (from the resolved config its checkpoint keeps), and scored by the run's kind's
scorer, the one evaluation uses, so a video gets the scores ``eval`` would give it. A run trained on
features recomputed by a fine-tuned frame CNN (``features/frame``) gets them recomputed by that same CNN,
whose checkpoint is checked against the one the features were made with.

All of it happens in a work folder of its own (``--work``; by default ``<WORK>/predict/<run>`` beside the
run, or a temporary folder for ``hpcvid predict``): ``manifest.json`` lists the videos, ``extract/`` (and
``features/<run>/``) hold their extraction shards, ``predict/<run>/pred-IIII-of-NNNN.h5`` each shard's scores
with its record. Shard ``I`` of ``N`` takes every N-th video (sorted by id), like extraction, so a shard
killed mid-way is redone and the others are kept. When the last shard is done, the table is written: one
row per video, the top classes and their scores (``--out``, CSV or JSON; WORK/predictions.csv by default).

``--timeline`` also slides a window (``predict.window`` kept frames, by default the run's ``seq_len``) over
each video in steps of half a window and labels each window (:mod:`hpcvid.learn.timeline`): per video a CSV
of the windows' times, top class and scores, and a PNG strip of the top class over time, in the folder
``<out>_timeline/``. The timeline lifts ``extract.max_frames`` so that it covers the whole video.

A video that cannot be read or scored is listed with its reason (in the table's ``error`` column and on the
console); the others are classified, and the command exits 3.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcvid.config import Config, replace
from hpcvid.errors import CheckpointError, ConfigError, HpcvidError, PartialFailure, StoreError, VideoError
from hpcvid.fileio import atomic_write_json, atomic_write_text, read_json, sha256_file
from hpcvid.launch.sharding import ShardSpec, all_shards, select
from hpcvid.storage.manifest import Manifest, VideoEntry, write_manifest
from hpcvid.workfolder import Unit, WorkFolder, digest

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "predict"      # manifest.dataset["format"] of a prediction folder
WINDOWS_PREFIX = "windows"       # the timeline's windows beside each prediction shard


# ------------------------------------------------------------------------------ stage protocol
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import positive_int

    parser.add_argument("inputs", nargs="*", metavar="VIDEO_OR_FOLDER",
                        help="videos, and folders searched (below) for videos (predict.inputs)")
    parser.add_argument("--run", metavar="RUN", help="the trained run: WORK/runs/NAME or a checkpoint file in it")
    parser.add_argument("--checkpoint", choices=("best", "last"), help="best.pt (default) or the newest checkpoint")
    parser.add_argument("--top", type=positive_int, metavar="K", help="classes listed per video (default 5)")
    parser.add_argument("--out", metavar="FILE", help="the table: .csv or .json (default WORK/predictions.csv)")
    parser.add_argument("--timeline", action="store_true", default=None,
                        help="label each window of each video too: CSV + PNG strip per video in <out>_timeline/")
    parser.add_argument("--window", type=positive_int, metavar="FRAMES",
                        help="timeline window in kept frames (default: the run's train.seq_len)")
    parser.add_argument("--stride", type=positive_int, metavar="FRAMES",
                        help="timeline step between windows (default: half a window)")
    parser.add_argument("--shards", type=positive_int, metavar="N", help="number of shards (default predict.shards)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the CNNs and the model run")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    absolute = [str(Path(p).absolute()) for p in args.inputs] if args.inputs else None
    return {"predict.inputs": absolute, "predict.run": _absolute(args.run), "predict.checkpoint": args.checkpoint,
            "predict.top": args.top, "predict.out": _absolute(args.out), "predict.timeline": args.timeline,
            "predict.window": args.window, "predict.stride": args.stride, "predict.shards": args.shards,
            "predict.device": args.device,
            # a prediction folder of its own: never the work folder of a job file (its manifest is the dataset's)
            "work": getattr(args, "work", None) or default_work(args.run)}


def _absolute(path: str | None) -> str | None:
    return str(Path(path).absolute()) if path else None


def default_work(run: str | None) -> str | None:
    """``WORK/predict/<run>`` for a run folder ``WORK/runs/<run>`` (or a checkpoint file in it)."""
    if not run:
        return None
    folder = Path(run).absolute()
    folder = folder.parent if folder.suffix == ".pt" else folder
    base = folder.parent.parent if folder.parent.name == "runs" else folder
    return str(base / "predict" / folder.name)


def run_dir(config: Config) -> Path:
    """The run folder ``predict.run`` names (the folder of a checkpoint file given)."""
    if not config.predict.run:
        raise ConfigError("predict needs a trained run: --run WORK/runs/NAME (or predict.run in the job file)")
    path = Path(config.predict.run)
    if not path.exists():
        raise ConfigError(f"predict.run {path} does not exist: give a run folder WORK/runs/NAME or a checkpoint in it")
    return path.parent if path.is_file() else path


def unit(config: Config) -> Unit:
    return Unit("predict", run_dir(config).name)


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """Index the videos, plan their extraction (and features) with the run's settings, then this unit."""
    from hpcvid.stages import extract, features
    from hpcvid.workfolder import planning_only

    run = TrainedRun.open(config)
    work = WorkFolder.of(config)
    check_prediction_folder(work)
    manifest = inputs_manifest(config, run)
    if planning_only() and not work.manifest.is_file():
        # a dry run writes nothing: there is no extraction to plan yet, every shard would run
        return all_shards(config.predict.shards, force) if only is None else [ShardSpec(only, config.predict.shards, force)]
    if not planning_only():
        write_manifest(manifest, work.root)
    extract.plan(run.extract_config(config), only, force)
    if run.features_unit is not None:
        features.plan(run.features_config(config), only, force)
    return work.plan(unit(config), config.predict.shards, identity(config, run), only=only, force=force)


def identity(config: Config, run: "TrainedRun") -> dict[str, Any]:
    """What the scores depend on: the checkpoint, the extraction (and features) set, the scoring settings."""
    work = WorkFolder.of(config)
    sets = {"extract": work.current_set(Unit("extract"))}
    if run.features_unit is not None:
        sets["features"] = work.current_set(run.features_unit)
    settings = {"eval": {k: v for k, v in config.to_dict()["eval"].items() if k not in ("shards", "batch_size", "device")},
                "timeline": config.predict.timeline, "window": run.window(config), "stride": run.stride(config)}
    return {"checkpoint": run.sha256, **{name: s.id if s else None for name, s in sets.items()},
            "settings": digest(settings)}


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print the table once every shard is done; exit 3 when videos could not be classified."""
    work, this = WorkFolder.of(config), unit(config)
    count = config.predict.shards
    done = [spec for spec in all_shards(count) if work.is_current(this, spec)]
    if len(done) < count:
        print(f"{this}: {len(done)} of {count} shards done in {work.unit_dir(this)}; the table is written when "
              "all are (`hpcvid status` follows them)")
        return 0
    table = write_outputs(config)
    print(format_table(table))
    print(f"predict: {len(table['videos'])} videos -> {table['out']}"
          + (f"; timelines in {table['timeline_dir']}" if table.get("timeline_dir") else ""))
    failed = [row for row in table["videos"] if row["error"]]
    if failed:
        raise PartialFailure(f"{len(failed)} of {len(table['videos'])} video(s) could not be classified, e.g. "
                             f"{failed[0]['video']}: {failed[0]['error']} (all listed in {table['out']})")
    return 0


# ------------------------------------------------------------------------------ the trained run
class TrainedRun:
    """The checkpoint a prediction uses, its resolved training config and its meta, and what follows from
    them: the extraction settings, the features it was trained on, the timeline's window."""

    def __init__(self, checkpoint: Path, payload: dict[str, Any]) -> None:
        from hpcvid.config import config_from_dict
        from hpcvid.learn.kinds import FEATURES, get_kind

        self.checkpoint = checkpoint
        self.sha256 = sha256_file(checkpoint)
        self.config = config_from_dict(payload["config"])
        self.kind = get_kind(payload["kind"])
        self.meta = dict(payload.get("meta", {}))
        self.classes = list(self.meta.get("classes", []))
        if not self.classes:
            raise CheckpointError(f"{checkpoint} names no classes: retrain it with this hpcvid")
        self.reads_features = FEATURES in self.kind.reads
        trained_on = Unit.parse((self.meta.get("trained_on") or {}).get("unit", "extract"))
        self.features_unit = trained_on if self.reads_features and trained_on.stage == "features" else None

    @classmethod
    def open(cls, config: Config) -> "TrainedRun":
        from hpcvid.learn.checkpoints import checkpoint_file, load_checkpoint

        folder = run_dir(config)
        found = checkpoint_file(Path(config.predict.run), config.predict.checkpoint)
        if found is None:
            raise CheckpointError(f"no checkpoint in {folder}: train it first (`hpcvid run train`)")
        return cls(found, load_checkpoint(found))

    def extract_config(self, config: Config) -> Config:
        """The run's extraction settings, into the prediction folder, over the indexed videos."""
        trained = self.config
        extract = replace(trained, **{"extract.shards": config.predict.shards, "extract.device": config.predict.device})
        if config.predict.timeline:
            extract = replace(extract, **{"extract.max_frames": 0})
        return _into(extract, config)

    def features_config(self, config: Config) -> Config:
        """The features stage's config: the frame run that made the features this run was trained on."""
        frame_run = self.frame_run()
        return replace(self.extract_config(config), **{"train.checkpoint": str(frame_run),
                                                       "train.device": config.predict.device})

    def training_work(self) -> Path:
        """The work folder the run was trained in: the folder above ``runs/`` (else the one its config names)."""
        folder = self.checkpoint.parent
        return folder.parent.parent if folder.parent.name == "runs" else Path(self.config.work)

    def frame_run(self) -> Path:
        """The frame CNN that computed this run's training features, checked to be the one that did."""
        from hpcvid.learn.checkpoints import checkpoint_file

        assert self.features_unit is not None
        work = WorkFolder(self.training_work())
        trained_on = self.meta["trained_on"]
        frame_run = work.run_dir(self.features_unit.run)
        current = work.current_set(self.features_unit)
        found = checkpoint_file(frame_run, "best")
        if current is None or current.id != trained_on.get("set") or found is None:
            raise StoreError(f"{self.checkpoint} was trained on features of {work.unit_dir(self.features_unit)} that "
                             "are no longer there (recomputed since): retrain the run, or predict with one trained "
                             "on the extraction's features")
        if sha256_file(found) != current.identity.get("checkpoint"):
            raise StoreError(f"{found} is not the frame CNN that computed the features {self.checkpoint} was trained "
                             "on (retrained since): retrain the run on the new features")
        return frame_run

    def source_classes(self) -> dict[str, str]:
        """Dataset class -> the run's class, for a run trained on a relabelled task (from the manifest of the
        work folder it was trained in; empty when that is not at hand)."""
        try:
            task = read_json(WorkFolder(self.training_work()).manifest).get("dataset", {}).get("task") or {}
        except (OSError, ValueError):
            return {}
        return {source: name for name, sources in task.items() if name in self.classes for source in sources}

    def window(self, config: Config) -> int:
        """The timeline's window in kept frames: predict.window, else the length the run was trained on (its
        sequence, or its clip for c3d); long enough for one flow stack when the model reads flow."""
        from hpcvid.learn.kinds import FLOW

        trained = self.meta.get("seq_len") or self.meta.get("clip_frames") or self.config.train.seq_len
        window = config.predict.window or int(trained)
        if FLOW in self.kind.reads:
            stack = self.meta.get("tsn_stack") or self.meta.get("flow_stack") or self.config.train.flow_stack
            window = max(window, int(stack) + 1)
        return window

    def stride(self, config: Config) -> int:
        return config.predict.stride or max(1, self.window(config) // 2)


def _into(trained: Config, config: Config) -> Config:
    """``trained`` working in the prediction folder: its videos are the manifest's (no dataset root of its
    own), its launch settings the prediction's."""
    import dataclasses

    dataset = dataclasses.replace(trained.dataset, root="", extra_roots=())
    return dataclasses.replace(trained, work=config.work, dataset=dataset, launch=config.launch,
                               eval=config.eval, predict=config.predict)


# ------------------------------------------------------------------------------ the videos
def check_prediction_folder(work: WorkFolder) -> None:
    """Refuse a folder that holds a dataset's work (its manifest would be replaced by the videos')."""
    if not work.manifest.is_file():
        return
    try:
        fmt = read_json(work.manifest).get("dataset", {}).get("format")
    except (OSError, ValueError):
        fmt = None
    if fmt != MANIFEST_FORMAT:
        raise ConfigError(f"{work.root} is a dataset's work folder (its manifest.json is not a prediction's): give "
                          f"predict a folder of its own with --work (default: WORK/predict/<run>)")


def find_videos(inputs: Sequence[str], extensions: Sequence[str]) -> list[tuple[Path, str]]:
    """(root, path below it) of every video named or found below a folder named, each file once."""
    if not inputs:
        raise ConfigError("predict: name the videos or folders to classify (VIDEO_OR_FOLDER ...)")
    wanted = tuple(e.lower() for e in extensions)
    found: list[tuple[Path, str]] = []
    seen: set[Path] = set()
    for given in inputs:
        path = Path(given)
        if path.is_file():
            pairs = [(path.parent, path.name)]
        elif path.is_dir():
            pairs = [(path, p.relative_to(path).as_posix()) for p in sorted(path.rglob("*"))
                     if p.is_file() and p.suffix.lower() in wanted]
            if not pairs:
                raise ConfigError(f"{path} holds no video ({', '.join(wanted)}): name the videos or another folder")
        else:
            raise ConfigError(f"{path} does not exist: name video files or folders of them")
        for root, relative in pairs:
            if (root / relative).resolve() not in seen:
                seen.add((root / relative).resolve())
                found.append((root, relative))
    return found


def inputs_manifest(config: Config, run: TrainedRun) -> Manifest:
    """The manifest of the videos to classify (every one in split "test"). A video in a folder named after
    one of the run's classes, or after a dataset class the run's task maps to one, gets that class as its
    true label (the table shows it); the others get -1."""
    from hpcvid.media.probe import probe_video

    pairs = find_videos(config.predict.inputs, run.config.dataset.extensions)
    roots = list(dict.fromkeys(str(root.absolute()) for root, _ in pairs))
    label_of = {name: i for i, name in enumerate(run.classes)}
    task_class = {**{name: name for name in run.classes}, **run.source_classes()}
    videos, ids = [], set()
    for root, relative in pairs:
        path = root / relative
        vid = base = str(Path(relative).with_suffix("").as_posix())
        copy = 1
        while vid in ids:                   # the same name below two folders named
            copy += 1
            vid = f"{base}~{copy}"
        ids.add(vid)
        true_class = task_class.get(path.parent.name, "")
        stat = path.stat()
        fields = dict(id=vid, path=relative, label=label_of.get(true_class, -1), class_name=true_class,
                      split="test", size=stat.st_size, mtime=stat.st_mtime, root=roots.index(str(root.absolute())))
        try:
            info = probe_video(path)
            fields.update(fps=info.fps, frames=info.frames, width=info.width, height=info.height)
        except VideoError as error:
            fields.update(probe_error=str(error))
        videos.append(VideoEntry(**fields))
    dataset = {"format": MANIFEST_FORMAT, "root": roots[0], "extra_roots": roots[1:], "split": 0,
               "run": str(run.checkpoint), "inputs": list(config.predict.inputs)}
    return Manifest(classes=tuple(run.classes), videos=tuple(videos), dataset=dataset)


def video_file(manifest: Manifest, entry: VideoEntry) -> str:
    roots = [manifest.dataset["root"], *manifest.dataset.get("extra_roots", [])]
    return str(Path(roots[entry.root]) / entry.path)


# ------------------------------------------------------------------------------ the shard
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Extract the shard's videos (resuming), score them and write the prediction shard and its record."""
    from hpcvid.learn.backbones import pick_device
    from hpcvid.learn.checkpoints import load_run
    from hpcvid.stages import extract, features
    from hpcvid.storage.manifest import load_manifest

    work, this = WorkFolder.of(config), unit(config)
    run = TrainedRun.open(config)
    shard_set = work.ensure_set(this, spec.count, identity(config, run))
    if work.is_current(this, spec) and not spec.force:
        return read_json(work.record_file(this, spec))
    started = time.time()
    extracted = extract.run_shard(run.extract_config(config), spec)
    if run.features_unit is not None:
        features.run_shard(run.features_config(config), spec)
    device = pick_device(config.predict.device)
    model, run_config, meta = load_run(run.checkpoint, device=str(device))
    manifest = load_manifest(work.root)
    videos = select(manifest.videos, spec, key=lambda v: v.id)
    inputs = shard_inputs(work, run, spec)
    scorer = run.kind.implementation().Scorer(model, meta, run_config, config, device, inputs)
    extract_failed = {f["video"]: f["reason"] for f in extracted.get("failed", [])}
    ids, scores, failed = [], {name: [] for name in scorer.strategies}, []
    windows: list[Any] = []
    window_scores: list[np.ndarray] = []
    import torch

    with torch.inference_mode():
        for video in videos:
            try:
                if video.id in extract_failed:
                    raise VideoError(extract_failed[video.id])
                result = scorer.score(video)
                if config.predict.timeline:
                    found, values = _timeline(run, config, model, meta, run_config, device, inputs, video)
                    windows += found
                    window_scores.append(values)
            except (VideoError, KeyError, ValueError) as exc:
                failed.append({"video": video.id, "path": video_file(manifest, video),
                               "reason": str(exc) or type(exc).__name__})
                log.warning("predict: %s: %s", video_file(manifest, video), exc)
                continue
            ids.append(video.id)
            for name in scorer.strategies:
                scores[name].append(result[name])
    extra = {"seconds": round(time.time() - started, 3), "set": shard_set.id, "checkpoint_sha256": run.sha256}
    if config.predict.timeline:
        extra["windows"] = _write_windows(work, this, spec, run, windows, window_scores, inputs)
    record = _write_scores(work, this, spec, run, manifest, ids, scores, scorer.default, failed, extra)
    try:
        finished_table(config)      # the last shard to finish writes the table
    except (HpcvidError, OSError) as error:
        log.warning("predict: shard %s is done, but the table could not be written (%s): run the same "
                    "command again to write it", spec.name, error)
    return record


def shard_inputs(work: WorkFolder, run: TrainedRun, spec: ShardSpec) -> Any:
    """The scorer's inputs: what the run reads of the videos of this shard's extraction (or features) shard."""
    from hpcvid.learn.datasets import ShardFeatureSource, ShardVideoSource
    from hpcvid.learn.kinds import EvalInputs
    from hpcvid.storage.shards import ShardReader

    if run.reads_features:
        source_unit = run.features_unit or Unit("extract")
        source = ShardFeatureSource([_verified_shard(work, source_unit, spec)], run.meta["feature_set"])
        return EvalInputs(source, {item.id: item for item in source.items})
    path = _verified_shard(work, Unit("extract"), spec)
    with ShardReader(path) as reader:
        info = {vid: reader.info(vid) for vid in reader.video_ids()}
    return EvalInputs(ShardVideoSource({vid: str(path) for vid in info}), info)


def _verified_shard(work: WorkFolder, source: Unit, spec: ShardSpec) -> Path:
    return work.current_shard(source, ShardSpec(spec.index, spec.count))


def _timeline(run: TrainedRun, config: Config, model: Any, meta: dict[str, Any], run_config: Config, device: Any,
              inputs: Any, video: VideoEntry) -> tuple[list[Any], np.ndarray]:
    from hpcvid.learn.timeline import score_windows

    entry = inputs.videos[video.id]
    frames = int(entry.frames if run.reads_features else entry["frames"])
    implementation = run.kind.implementation()

    def make_scorer(window_inputs: Any) -> Any:
        return implementation.Scorer(model, meta, run_config, config, device, window_inputs)

    return score_windows(make_scorer, inputs, video.id, frames, run.window(config), run.stride(config),
                         run.reads_features)


def _write_windows(work: WorkFolder, this: Unit, spec: ShardSpec, run: TrainedRun, windows: Sequence[Any],
                   values: Sequence[np.ndarray], inputs: Any) -> dict[str, str]:
    """The timeline's windows as a prediction file of their own (``windows-IIII-of-NNNN.h5``, ids
    ``video@start:stop``) with its record, written before the shard's record; returns what that names."""
    from hpcvid.launch.sharding import ShardSpec as Spec
    from hpcvid.storage.predictions import PredictionShard, write_prediction_shard
    from hpcvid.version import code_version

    folder = work.unit_dir(this)
    h5, record = folder / f"{WINDOWS_PREFIX}-{spec.name}.h5", folder / f"{WINDOWS_PREFIX}-{spec.name}.json"
    n = len(windows)
    scores = np.concatenate(values) if values else np.zeros((0, len(run.classes)), np.float32)
    shard = PredictionShard(model=run.kind.name, run=this.run, shard=Spec(spec.index, spec.count),
                            classes=tuple(run.classes), video_ids=[w.id for w in windows],
                            labels=np.full(n, -1, dtype=np.int64), scores={"window": scores},
                            default_strategy="window", splits=["window"] * n, checkpoint=str(run.checkpoint),
                            checkpoint_sha256=run.sha256, code_version=code_version())
    written = write_prediction_shard(h5, record, shard, extra_record={"times": _window_times(work, spec, windows)})
    return {"file": h5.name, "sha256": written["sha256"]}


def _window_times(work: WorkFolder, spec: ShardSpec, windows: Sequence[Any]) -> dict[str, list[float]]:
    """Seconds into its video of each window's first frame and of the end of its last (from the frame
    numbers extraction kept and the video's frame rate)."""
    from hpcvid.storage.shards import ShardReader

    times: dict[str, list[float]] = {}
    with ShardReader(_verified_shard(work, Unit("extract"), spec)) as reader:
        kept: dict[str, tuple[np.ndarray, float]] = {}
        for w in windows:
            if w.video not in kept:
                info = reader.info(w.video)
                kept[w.video] = (np.asarray(info["frame_indices"]), float(info.get("fps") or 25.0))
            indices, fps = kept[w.video]
            times[w.id] = [round(float(indices[w.start]) / fps, 4), round(float(indices[w.stop - 1] + 1) / fps, 4)]
    return times


def _write_scores(work: WorkFolder, this: Unit, spec: ShardSpec, run: TrainedRun, manifest: Manifest,
                  ids: list[str], scores: dict[str, list[np.ndarray]], default: str, failed: list[dict[str, str]],
                  extra: dict[str, Any]) -> dict[str, Any]:
    """The shard's scores under every strategy of the scorer (the table shows the default), record last."""
    from hpcvid.storage.predictions import PredictionShard, write_prediction_shard
    from hpcvid.version import code_version

    label = {v.id: v.label for v in manifest.videos}
    n_classes = len(run.classes)
    shard = PredictionShard(
        model=run.kind.name, run=this.run, shard=spec, classes=tuple(run.classes), video_ids=ids,
        labels=np.array([label[i] for i in ids], dtype=np.int64),
        scores={name: np.array(values, dtype=np.float32).reshape(len(ids), n_classes) for name, values in scores.items()},
        default_strategy=default, checkpoint=str(run.checkpoint), checkpoint_sha256=run.sha256,
        code_version=code_version())
    return write_prediction_shard(work.shard_file(this, spec), work.record_file(this, spec), shard, failed=failed,
                                  extra_record=extra)


# ------------------------------------------------------------------------------ the table
def output_path(config: Config) -> Path:
    return Path(config.predict.out) if config.predict.out else WorkFolder.of(config).root / "predictions.csv"


def timeline_dir(out: Path) -> Path:
    return out.with_name(out.stem + "_timeline")


def gather(config: Config) -> dict[str, Any]:
    """Every shard's scores (each file checked against its record), in the order the videos were named."""
    from hpcvid.storage.manifest import load_manifest
    from hpcvid.storage.predictions import read_prediction_shard

    work, this = WorkFolder.of(config), unit(config)
    manifest = load_manifest(work.root)
    scored: dict[str, np.ndarray] = {}
    failed: dict[str, str] = {}
    windows: dict[str, list[tuple[str, list[float], np.ndarray]]] = {}
    strategy, checkpoint = "", ""
    for path in work.current_shards(this):
        record = read_json(work.record_file(this, _spec_of(path)))
        shard = read_prediction_shard(path)
        strategy, checkpoint = shard.default_strategy, shard.checkpoint
        scored.update(zip(shard.video_ids, shard.scores[strategy]))
        failed.update({f["video"]: f["reason"] for f in record.get("failed", [])})
        if "windows" in record:
            for window_id, times, values in _read_windows(work, this, path, record["windows"]):
                windows.setdefault(window_id.rsplit("@", 1)[0], []).append((window_id, times, values))
    classes = list(manifest.classes)
    return {"manifest": manifest, "classes": classes, "scored": scored, "failed": failed, "windows": windows,
            "strategy": strategy, "checkpoint": checkpoint}


def _spec_of(path: Path) -> ShardSpec:
    from hpcvid.storage.predictions import parse_shard_name

    spec = parse_shard_name(path.name)
    assert spec is not None
    return spec


def _read_windows(work: WorkFolder, this: Unit, shard_path: Path, named: dict[str, str]) -> list[tuple]:
    from hpcvid.storage.predictions import read_prediction_shard
    from hpcvid.workfolder import redo_hint

    path = shard_path.parent / named["file"]
    work.verify(path, named["sha256"], fix=redo_hint(this, _spec_of(shard_path).index))
    times = read_json(path.with_suffix(".json"))["times"]
    shard = read_prediction_shard(path)
    return [(wid, times[wid], values) for wid, values in zip(shard.video_ids, shard.scores["window"])]


def write_outputs(config: Config) -> dict[str, Any]:
    """The table (CSV or JSON by ``out``'s suffix) and, with timelines, a CSV and a PNG per video."""
    found = gather(config)
    manifest, classes, top = found["manifest"], found["classes"], min(config.predict.top, len(found["classes"]))
    rows = []
    for video in manifest.videos:
        row: dict[str, Any] = {"video": video_file(manifest, video), "true_class": video.class_name, "top": [],
                               "error": ""}
        if video.id in found["scored"]:
            values = found["scored"][video.id]
            order = np.argsort(-values, kind="stable")[:top]
            row["top"] = [(classes[i], float(values[i])) for i in order]
        else:
            row["error"] = found["failed"].get(video.id, "not scored")
        rows.append(row)
    out = output_path(config)
    table = {"run": found["checkpoint"], "strategy": found["strategy"], "top": top, "videos": rows, "out": str(out)}
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".json":
        atomic_write_json(out, {k: v for k, v in table.items() if k != "out"})
    else:
        atomic_write_text(out, table_csv(rows, top))
    if found["windows"]:
        folder = timeline_dir(out)
        folder.mkdir(parents=True, exist_ok=True)
        for video in manifest.videos:
            if video.id in found["windows"]:
                write_timeline(folder / timeline_name(video.id), video_file(manifest, video), classes,
                               found["windows"][video.id])
        table["timeline_dir"] = str(folder)
    return table


def table_csv(rows: Sequence[dict[str, Any]], top: int) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["video", "true_class", *[f"{kind}_{k}" for k in range(1, top + 1) for kind in ("class", "score")],
                     "error"])
    for row in rows:
        cells = [value for name, score in row["top"] for value in (name, f"{score:.6f}")]
        cells += [""] * (2 * top - len(cells))
        writer.writerow([row["video"], row["true_class"], *cells, row["error"]])
    return buffer.getvalue()


def format_table(table: dict[str, Any], limit: int = 40) -> str:
    """The console's view: one line per video, its best classes with scores (the first ``limit`` videos)."""
    rows = table["videos"]
    width = min(48, max([len(_short(r["video"])) for r in rows] + [5]))
    lines = [f"{'video':<{width}}  top classes ({table['strategy']})"]
    for row in rows[:limit]:
        text = ("FAILED: " + row["error"]) if row["error"] else \
            "  ".join(f"{name} {score:.2f}" for name, score in row["top"])
        truth = f"  [true: {row['true_class']}]" if row["true_class"] else ""
        lines.append(f"{_short(row['video']):<{width}}  {text}{truth}")
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more in {table['out']}")
    return "\n".join(lines)


def _short(path: str) -> str:
    relative = os.path.relpath(path)
    return relative if not relative.startswith("..") else path


def timeline_name(video_id: str) -> str:
    """A file name for a video's timeline: its id with '/' as '__' and a short digest when that collides."""
    safe = video_id.replace("/", "__")
    return safe if safe.replace("__", "/") == video_id else f"{safe}-{hashlib.sha1(video_id.encode()).hexdigest()[:6]}"


def write_timeline(stem: Path, video: str, classes: Sequence[str], windows: Sequence[tuple]) -> None:
    """``stem.csv``: per window its kept frames, seconds, top class and every class's score; ``stem.png``:
    the top class over time as a coloured strip above each class's score."""
    windows = sorted(windows, key=lambda w: w[1][0])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["start_frame", "stop_frame", "start_s", "end_s", "top_class", "top_score", *classes])
    for window_id, (start_s, end_s), values in windows:
        start, stop = window_id.rsplit("@", 1)[1].split(":")
        best = int(np.argmax(values))
        writer.writerow([start, stop, f"{start_s:.3f}", f"{end_s:.3f}", classes[best], f"{values[best]:.6f}",
                         *(f"{v:.6f}" for v in values)])
    atomic_write_text(stem.with_suffix(".csv"), buffer.getvalue())
    plot_timeline(stem.with_suffix(".png"), video, classes, windows)


def plot_timeline(path: Path, video: str, classes: Sequence[str], windows: Sequence[tuple]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hpcvid.fileio import atomic_path

    centres = np.array([(a + b) / 2 for _, (a, b), _ in windows])
    values = np.stack([v for _, _, v in windows])
    best = values.argmax(axis=1)
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    edges = np.concatenate([[windows[0][1][0]], (centres[1:] + centres[:-1]) / 2, [windows[-1][1][1]]])
    figure, (strip, lines) = plt.subplots(2, 1, figsize=(9, 3.2), sharex=True,
                                          gridspec_kw={"height_ratios": [1, 3]})
    for k, label in enumerate(best):
        strip.axvspan(edges[k], edges[k + 1], color=colours(label % colours.N))
    strip.set_yticks([])
    strip.set_title(f"{Path(video).name}: top class per window", fontsize=9)
    shown = sorted(set(best.tolist()) | set(np.argsort(-values.max(axis=0))[:3].tolist()))
    for c in shown:
        lines.plot(centres, values[:, c], marker=".", color=colours(c % colours.N), label=classes[c])
    lines.set_ylim(0, 1.02)
    lines.set_xlim(edges[0], edges[-1])
    lines.set_xlabel("seconds")
    lines.set_ylabel("score")
    lines.legend(fontsize=7, loc="upper right", ncol=2)
    figure.tight_layout()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=100, format="png")
    plt.close(figure)


def finished_table(config: Config) -> dict[str, Any] | None:
    """Write the table when every shard of the current set is done (the last shard to finish does it)."""
    work, this = WorkFolder.of(config), unit(config)
    if all(work.is_current(this, spec) for spec in all_shards(config.predict.shards)):
        return write_outputs(config)
    return None
