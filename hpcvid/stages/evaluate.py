"""The ``eval`` stage: class scores of every test video under several inference strategies, sharded.

Run manual::

    hpcvid run eval --work WORK --model lstm [--shards 4] [--shard I] [--force]
    hpcvid submit eval --config jobs/ucf101.toml --model lstm --shards 4      # one SLURM array task per shard
    hpcvid collect WORK                                                       # the reducer

Shard ``I`` of ``N`` takes every N-th test video of the manifest (sorted by id) and writes
``WORK/eval/<model>/pred-IIII-of-NNNN.h5`` and, last, its record (:mod:`hpcvid.storage.predictions`). A shard whose
record of the unit's current set exists is skipped (``--force`` redoes it); a shard killed mid-way leaves no record
and is redone.

The model comes from :func:`hpcvid.learn.checkpoints.load_run` (``best.pt`` by default, ``eval.checkpoint =
"last"`` for the newest). Its kind (:data:`hpcvid.learn.kinds.KINDS`) says what it reads; this stage opens
those test videos (:func:`video_source` for frames and flow, :func:`feature_inputs` for features) and the
kind's ``Scorer`` scores them, preparing inputs with the functions of :mod:`hpcvid.learn.datasets` that
training used (ImageNet normalisation, camera-compensated flow stacks, standardised and temporally centred
features). Each scorer reports several inference strategies side by side, the default first (what
validation used); its kind's module lists them (e.g. :mod:`hpcvid.learn.kinds.lstm`).

Scores are softmax probabilities (float32). A test video that cannot be scored (missing from the extraction
shards, no flow, ...) is listed in the record's ``failed`` with the reason; ``hpcvid collect`` then names
it. torch is imported inside functions so ``hpcvid --help`` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from hpcvid.config import Config
from hpcvid.errors import PartialFailure, StoreError, VideoError
from hpcvid.fileio import read_json, sha256_file
from hpcvid.launch.sharding import ShardSpec, all_shards, select
from hpcvid.learn.kinds import FEATURES, EvalInputs, get_kind, kind_names
from hpcvid.storage.manifest import load_manifest
from hpcvid.storage.predictions import PredictionShard, write_prediction_shard
from hpcvid.version import code_version
from hpcvid.workfolder import Unit, WorkFolder, digest

log = logging.getLogger(__name__)



# ------------------------------------------------------------------------------ stage protocol
def add_arguments(parser: argparse.ArgumentParser) -> None:
    from hpcvid.cli import positive_int

    parser.add_argument("--model", choices=kind_names(), help="which trained run of WORK/runs/ to evaluate")
    parser.add_argument("--shards", type=positive_int, metavar="N",
                        help="number of prediction shards (default: eval.shards)")
    parser.add_argument("--checkpoint", choices=("best", "last"), help="best.pt (default) or the newest checkpoint")
    parser.add_argument("--window-stride", type=positive_int, metavar="FRAMES", help="lstm: stride between windows")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.model": args.model, "eval.shards": args.shards, "eval.checkpoint": args.checkpoint,
            "eval.window_stride": args.window_stride}


def run_name(config: Config) -> str:
    return config.train.model


def unit(config: Config) -> Unit:
    return Unit("eval", run_name(config))


def identity(config: Config) -> dict[str, Any]:
    """What the scores depend on: the checkpoint (None until trained), the extraction, the eval settings."""
    from hpcvid.learn.checkpoints import checkpoint_file

    work = WorkFolder.of(config)
    extract = work.current_set(Unit("extract"))
    found = checkpoint_file(work.run_dir(run_name(config)), config.eval.checkpoint)
    settings = {k: v for k, v in config.to_dict()["eval"].items() if k not in ("shards", "batch_size", "device")}
    return {"checkpoint": sha256_file(found) if found else None, "extract": extract.id if extract else None,
            "settings": digest(settings)}


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """All shards (or shard ``only``) without a record of the current set; every one with ``force``."""
    work = WorkFolder.of(config).require("eval")
    return work.plan(unit(config), config.eval.shards, identity(config), only=only, force=force)


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print what was scored; exit 0, or raise PartialFailure (exit 3) when videos failed."""
    work, this = WorkFolder.of(config), unit(config)
    for record in records:
        print(f"{this} shard {record['shard']}: {record['n_videos']} videos scored, "
              f"{len(record['failed'])} failed, {record.get('seconds', 0):.1f} s")
    count = config.eval.shards
    done = [read_json(work.record_file(this, spec)) for spec in all_shards(count) if work.is_current(this, spec)]
    print(f"{this}: {len(done)} of {count} shards done in {work.unit_dir(this)}; next: hpcvid collect {config.work}")
    failed = [f for record in done for f in record.get("failed", [])]
    if failed:
        raise PartialFailure(f"{this}: {len(failed)} test video(s) could not be scored, e.g. "
                             f"{failed[0]['video']}: {failed[0]['reason']} (see the records in {work.unit_dir(this)})")
    return 0


# ------------------------------------------------------------------------------ the shard
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Score the test videos of shard ``spec`` and write the prediction shard and its record (last)."""
    import torch

    from hpcvid.learn.backbones import pick_device
    from hpcvid.launch.progress import write_progress
    from hpcvid.learn.checkpoints import load_run

    work, this = WorkFolder.of(config), unit(config)
    shard_set = work.ensure_set(this, spec.count, identity(config))
    if work.is_current(this, spec) and not spec.force:
        return read_json(work.record_file(this, spec))
    started = time.time()
    run = run_name(config)
    device = pick_device(config.eval.device)
    model, run_config, meta = load_run(work.run_dir(run), which=config.eval.checkpoint, device=str(device))
    check_trained_on(work, meta)
    manifest = load_manifest(config.work_dir)
    if list(meta.get("classes", manifest.classes)) != list(manifest.classes):
        raise StoreError(f"{meta['checkpoint']} was trained on other classes than {work.manifest}: "
                         "retrain, or evaluate in the work folder it was trained in")
    videos = select(manifest.by_split("test"), spec, key=lambda v: v.id)
    scorer = make_scorer(model, meta, run_config, config, device)
    ids: list[str] = []
    labels: list[int] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorer.strategies}
    failed: list[dict[str, str]] = []
    write_progress(config.work, this, spec, done=0, total=len(videos), started=started)
    with torch.inference_mode():
        for done, video in enumerate(_progress(videos, f"{this} {spec.name}"), start=1):
            try:
                result = scorer.score(video)
            except (VideoError, KeyError, ValueError) as exc:   # a StoreError (corrupt file) stops the shard
                failed.append({"video": video.id, "reason": str(exc) or type(exc).__name__})
                log.warning("%s: %s failed: %s", this, video.id, exc)
            else:
                ids.append(video.id)
                labels.append(video.label)
                for name in scorer.strategies:
                    scores[name].append(result[name])
            write_progress(config.work, this, spec, done=done, total=len(videos), failed=len(failed))
    n_classes = len(manifest.classes)
    shard = PredictionShard(
        model=meta["kind"], run=run, shard=spec, classes=tuple(manifest.classes), video_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        scores={name: np.array(values, dtype=np.float32).reshape(len(ids), n_classes) for name, values in scores.items()},
        default_strategy=scorer.default, checkpoint=work.relative(meta["checkpoint"]),
        checkpoint_sha256=sha256_file(meta["checkpoint"]),
        config={"run": run_config.to_dict(), "eval": config.to_dict()["eval"]}, code_version=code_version(),
    )
    return write_prediction_shard(work.shard_file(this, spec), work.record_file(this, spec), shard, failed=failed,
                                  extra_record={"seconds": round(time.time() - started, 3), "set": shard_set.id,
                                                "trained_code_version": meta.get("code_version", ""),
                                                "epoch": meta.get("epoch")})


def check_trained_on(work: WorkFolder, meta: dict[str, Any]) -> None:
    """Refuse a model whose training inputs are no longer the current set of their unit (re-extracted since)."""
    trained_on = meta.get("trained_on") or {}
    if not trained_on:
        return
    source = Unit.parse(trained_on["unit"])
    current = work.current_set(source)
    if current is None or current.id != trained_on["set"]:
        raise StoreError(f"{meta['checkpoint']} was trained on another {source} set than the current one in "
                         f"{work.unit_dir(source)} (re-extracted or recomputed since): retrain it, or restore the "
                         "set it was trained on")


def _progress(items: Sequence[Any], label: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="video", leave=False, mininterval=1.0)


# ------------------------------------------------------------------------------ scorers and their inputs
def make_scorer(model: Any, meta: dict[str, Any], run_config: Config, config: Config, device: Any,
                splits: tuple[str, ...] | None = ("test",)) -> Any:
    """The scorer of the checkpoint's kind, given the videos of ``splits`` (None: all) that kind reads."""
    kind = get_kind(meta["kind"])
    inputs = feature_inputs(config, meta) if FEATURES in kind.reads else video_source(config, splits)
    return kind.implementation().Scorer(model, meta, run_config, config, device, inputs)


def video_source(config: Config, splits: tuple[str, ...] | None = ("test",)) -> EvalInputs:
    """The videos of ``splits`` (None: all; evaluation: the test split) of the current extraction shards: a
    :class:`hpcvid.learn.datasets.ShardVideoSource` and each one's info."""
    from hpcvid.learn.datasets import ShardVideoSource
    from hpcvid.storage.shards import ShardReader

    shards = WorkFolder.of(config).current_shards(Unit("extract"))
    shard_of, info = {}, {}
    for path in shards:
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                if splits is None or reader.info(vid).get("split") in splits:
                    shard_of[vid] = str(path)
                    info[vid] = reader.info(vid)
    return EvalInputs(ShardVideoSource(shard_of), info)


def feature_inputs(config: Config, meta: dict[str, Any]) -> EvalInputs:
    """The feature set the run was trained on, from the current shards of the unit it was trained on."""
    from hpcvid.learn.datasets import ShardFeatureSource

    source_unit = Unit.parse((meta.get("trained_on") or {}).get("unit", "extract"))
    source = ShardFeatureSource(WorkFolder.of(config).current_shards(source_unit), meta["feature_set"])
    return EvalInputs(source, {item.id: item for item in source.items})
