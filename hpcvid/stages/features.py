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
from hpcvid.fileio import sha256_file
from hpcvid.launch.sharding import ShardSpec
from hpcvid.workfolder import Unit, WorkFolder

log = logging.getLogger(__name__)

FEATURE_NAME = "finetuned"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", metavar="RUN",
                        help="the frame CNN: a run folder (best.pt inside) or a checkpoint file; "
                             "default WORK/runs/frame")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the CNN runs")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.checkpoint": args.checkpoint, "train.device": getattr(args, "device", None)}


def checkpoint_of(config: Config) -> Path:
    """The frame CNN's run folder or checkpoint file (``train.checkpoint``; default WORK/runs/frame)."""
    return Path(config.train.checkpoint) if config.train.checkpoint else WorkFolder.of(config).run_dir("frame")


def unit(config: Config) -> Unit:
    """``features/<run>``: named after the frame run whose CNN computes the features."""
    source = checkpoint_of(config)
    return Unit("features", source.parent.name if source.suffix == ".pt" else source.name)


def identity(config: Config) -> dict[str, Any]:
    """The extraction set the frames come from and the checkpoint (None until it has been trained)."""
    from hpcvid.learn.checkpoints import checkpoint_file

    extract = WorkFolder.of(config).current_set(Unit("extract"))
    found = checkpoint_file(checkpoint_of(config), "best")
    return {"extract": extract.id if extract else None, "checkpoint": sha256_file(found) if found else None}


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """One shard per extraction shard; those with a record of the current set are skipped unless --force."""
    work = WorkFolder.of(config).require("features")
    extract = work.current_set(Unit("extract"))
    if extract is None:
        raise StoreError(f"{work.unit_dir(Unit('extract'))} holds no planned extraction: run extract first")
    return work.plan(unit(config), extract.count, identity(config), only=only, force=force)


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

    work = WorkFolder.of(config)
    this = unit(config)
    shard_set = work.ensure_set(this, spec.count, identity(config))
    record_file = work.record_file(this, spec)
    if work.is_current(this, spec) and not spec.force:
        return read_json(record_file)
    # only this shard's extraction is needed (checked before anything of this shard is removed): features
    # shard I can run as soon as extraction shard I is done
    shard_file = work.current_shard(Unit("extract"), ShardSpec(spec.index, spec.count))
    with contextlib.suppress(FileNotFoundError):
        record_file.unlink()               # the record goes first: the shard never looks done while redone
    out = work.unit_dir(this)
    out.mkdir(parents=True, exist_ok=True)
    for partial in out.glob(f".shard-{spec.name}.*.partial"):
        partial.unlink(missing_ok=True)
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
    provenance = {"checkpoint": work.relative(meta["checkpoint"]), "checkpoint_sha256": sha256_file(meta["checkpoint"]),
                  "epoch": meta["epoch"], "code_version": meta["code_version"], "feature_name": FEATURE_NAME,
                  "classes": meta.get("classes", []), "extract_shard": shard_file.name}
    return write_features_shard(out, spec, videos, failed=failed, meta=provenance, record_extra={"set": shard_set.id})


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    out = WorkFolder.of(config).unit_dir(unit(config))
    for record in records:
        print(f"features shard {record['shard']}: {record['n_videos']} videos, {record['n_frames']} frames, "
              f"{record['n_failed']} failed -> {out / record['file']}")
    failed = sum(r["n_failed"] for r in records)
    if failed:
        raise PartialFailure(f"{failed} video(s) failed; see 'failed' in the records in {out}")
    return 0
