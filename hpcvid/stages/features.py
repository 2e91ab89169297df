"""The ``features`` stage: per-frame features and class scores from the FINE-TUNED frame CNN.

Extraction computed features with an ImageNet (or random) backbone. After ``hpcvid run train --model
frame`` fine-tuned that CNN on the dataset, this stage recomputes, from the frames the extract shards
already hold (no decoding again), every video's per-frame features ``features/finetuned (T, D)`` and
per-frame class scores ``scores/finetuned (T, C)`` (logits), so that

* the LSTM can train on features that know the classes (``train.features`` = "" or "finetuned" picks them),
* the single-frame baseline can be scored from the per-frame scores.

Output: ``WORK/features/frame/shard-IIII-of-NNNN.h5`` + its record ``.json`` (written last), one shard per
extract shard, in the shard layout of :mod:`hpcvid.storage.shards` (features-only; ``hpcvid run merge
--features-dir WORK/features/frame`` builds ``WORK/features/frame/features.h5`` from them). A shard whose
record exists is skipped (``--force`` redoes it), so a rerun redoes only the shards in flight.

This is a stage module: torch is imported inside functions only.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from pathlib import Path
from typing import Any, Sequence

from hpcvid.config import Config
from hpcvid.errors import CheckpointError, PartialFailure, StoreError
from hpcvid.launch.sharding import ShardSpec

log = logging.getLogger(__name__)

HELP = "recompute per-frame features + scores with the fine-tuned frame CNN into WORK/features/frame/"
FEATURE_NAME = "finetuned"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="the frame CNN: a run folder (best.pt inside) or a checkpoint file; "
                             "default WORK/runs/frame")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the CNN runs")
    parser.add_argument("--force", action="store_true", help="redo shards whose record exists")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.checkpoint": args.checkpoint, "train.device": getattr(args, "device", None)}


def output_dir(config: Config) -> Path:
    from hpcvid.stages.train import refeature_dir

    return refeature_dir(config.work_dir)


def checkpoint_of(config: Config) -> Path:
    return Path(config.train.checkpoint) if config.train.checkpoint else config.work_dir / "runs" / "frame"


def _extract_records(config: Config) -> list[Path]:
    from hpcvid.stages.merge import find_shard_records

    return find_shard_records(config.work_dir / "extract")


def record_path(config: Config, spec: ShardSpec) -> Path:
    return output_dir(config) / f"shard-{spec.name}.json"


def plan(config: Config, args: argparse.Namespace | None = None) -> list[ShardSpec]:
    """One shard per extract shard; those with a record are skipped unless --force."""
    force = bool(getattr(args, "force", False))
    count = len(_extract_records(config))
    specs = [ShardSpec(i, count, force) for i in range(count)]
    return [s for s in specs if force or not record_path(config, s).is_file()]


def load_frame_cnn(config: Config) -> tuple[Any, dict[str, Any]]:
    """The fine-tuned frame model (eval mode) and its meta; anything but a frame run is refused."""
    from hpcvid.learn.checkpoints import load_run

    model, _, meta = load_run(checkpoint_of(config), which="best")
    if meta["kind"] != "frame":
        raise CheckpointError(f"{meta['checkpoint']} holds a {meta['kind']!r} model; `run features` needs a "
                              "frame CNN (train one with `hpcvid run train --model frame`)")
    return model, meta


def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Recompute features and scores for every video of extract shard ``spec``; return the record."""
    from hpcvid.learn.backbones import pick_device
    from hpcvid.learn.extractor import FeatureExtractor
    from hpcvid.fileio import read_json, sha256_file
    from hpcvid.storage.shards import VIDEO_ATTRIBUTES, ShardReader, VideoData, write_features_shard

    out = output_dir(config)
    record_file = record_path(config, spec)
    if record_file.is_file() and not spec.force:
        return read_json(record_file)
    if spec.force:
        with contextlib.suppress(FileNotFoundError):
            record_file.unlink()           # the record goes first: the shard never looks done while redone
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(f".shard-{spec.name}.*.partial"):
        partial.unlink(missing_ok=True)
    extract_record = config.work_dir / "extract" / f"shard-{spec.name}.json"
    if not extract_record.is_file():
        raise StoreError(f"{extract_record} does not exist: `run features` shards follow the extract shards "
                         f"({len(_extract_records(config))} of them); run extract first")
    shard_file = config.work_dir / "extract" / read_json(extract_record)["file"]
    model, meta = load_frame_cnn(config)
    extractor = FeatureExtractor(model.trunk, device=str(pick_device(config.train.device)),
                                 batch_size=config.extract.batch_size, head=model.head, precision="fp32")
    videos, failed = [], []
    with ShardReader(shard_file) as reader:
        for vid in reader.video_ids():
            info = reader.info(vid)
            if not info["has_frames"]:
                failed.append({"video": vid, "reason": f"no stored frames in {shard_file}"})
                continue
            features, scores = extractor.extract_with_scores(reader.frames(vid))
            videos.append(VideoData(vid, {k: info[k] for k in VIDEO_ATTRIBUTES if k in info},
                                    info["frame_indices"], features={FEATURE_NAME: features},
                                    scores={FEATURE_NAME: scores}))
    provenance = {"checkpoint": meta["checkpoint"], "checkpoint_sha256": sha256_file(meta["checkpoint"]),
                  "epoch": meta["epoch"], "code_version": meta["code_version"], "feature_name": FEATURE_NAME,
                  "classes": meta.get("classes", []), "extract_shard": shard_file.name}
    return write_features_shard(out, spec, videos, failed=failed, meta=provenance)


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    for record in records:
        print(f"features shard {record['shard']}: {record['n_videos']} videos, {record['n_frames']} frames, "
              f"{record['n_failed']} failed -> {output_dir(config) / record['file']}")
    failed = sum(r["n_failed"] for r in records)
    if failed:
        raise PartialFailure(f"{failed} video(s) failed; see 'failed' in the records in {output_dir(config)}")
    return 0
