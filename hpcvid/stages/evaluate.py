"""The ``eval`` stage: class scores of every test video under several inference strategies, sharded.

Run manual::

    hpcvid run eval --work WORK --model lstm [--shards 4] [--shard I] [--force]
    hpcvid submit eval --config jobs/ucf101.toml --model lstm --shards 4      # one SLURM array task per shard
    hpcvid collect WORK                                                       # the reducer

Shard ``I`` of ``N`` takes every N-th test video of the manifest (sorted by id) and writes
``WORK/eval/<model>/pred-IIII-of-NNNN.h5`` and, last, its record (:mod:`hpcvid.storage.predictions`). A shard whose
record exists is skipped (``--force`` redoes it); a shard killed mid-way leaves no record and is redone.

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
from hpcvid.learn.kinds import FEATURES, EvalInputs, get_kind, kind_names
from hpcvid.storage.manifest import load_manifest
from hpcvid.storage.predictions import EVAL_DIR, PredictionShard, code_version, shard_paths, write_prediction_shard
from hpcvid.launch.sharding import ShardSpec, all_shards, pending_shards, select

log = logging.getLogger(__name__)

HELP = "score the test videos with a trained model under several inference strategies -> WORK/eval/<model>/"


# ------------------------------------------------------------------------------ stage protocol
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=kind_names(), help="which trained run of WORK/runs/ to evaluate")
    parser.add_argument("--shards", type=int, metavar="N", help="number of prediction shards (default: eval.shards)")
    parser.add_argument("--shard", type=int, metavar="I", help="run only shard I (0-based); default: all")
    parser.add_argument("--force", action="store_true", help="redo shards whose record exists")
    parser.add_argument("--checkpoint", choices=("best", "last"), help="best.pt (default) or the newest checkpoint")
    parser.add_argument("--window-stride", type=int, metavar="FRAMES", help="lstm: stride between windows")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.model": args.model, "eval.shards": args.shards, "eval.checkpoint": args.checkpoint,
            "eval.window_stride": args.window_stride}


def run_name(config: Config) -> str:
    return config.train.model


def record_path(config: Config, spec: ShardSpec) -> Path:
    return shard_paths(config.work_dir, run_name(config), spec)[1]


def shard_done(config: Config, spec: ShardSpec) -> bool:
    """A shard is done exactly when its record exists (it is written last)."""
    return record_path(config, spec).is_file()


def plan(config: Config, args: argparse.Namespace) -> list[ShardSpec]:
    """All shards (or --shard I), minus those whose record exists unless --force."""
    return pending_shards(config.eval.shards, getattr(args, "shard", None), bool(getattr(args, "force", False)),
                          lambda spec: record_path(config, spec), "eval")


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Print what was scored; exit 0, or raise PartialFailure (exit 3) when videos failed."""
    run = run_name(config)
    for record in records:
        print(f"eval {run} shard {record['shard']}: {record['n_videos']} videos scored, "
              f"{len(record['failed'])} failed, {record.get('seconds', 0):.1f} s")
    count = config.eval.shards
    done = [read_json(p) for spec in all_shards(count) if (p := record_path(config, spec)).is_file()]
    print(f"eval {run}: {len(done)} of {count} shards done in {config.work_dir / EVAL_DIR / run}; "
          f"next: hpcvid collect {config.work}")
    failed = [f for record in done for f in record.get("failed", [])]
    if failed:
        raise PartialFailure(f"eval {run}: {len(failed)} test video(s) could not be scored, e.g. "
                             f"{failed[0]['video']}: {failed[0]['reason']} (see the records in "
                             f"{config.work_dir / EVAL_DIR / run})")
    return 0


# ------------------------------------------------------------------------------ the shard
def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Score the test videos of shard ``spec`` and write the prediction shard and its record (last)."""
    import torch

    from hpcvid.learn.backbones import pick_device
    from hpcvid.launch.progress import write_progress
    from hpcvid.learn.checkpoints import load_run

    if shard_done(config, spec) and not spec.force:
        return read_json(record_path(config, spec))
    started = time.time()
    run = run_name(config)
    run_dir = config.work_dir / "runs" / run
    device = pick_device(config.eval.device)
    model, run_config, meta = load_run(run_dir, which=config.eval.checkpoint, device=str(device))
    manifest = load_manifest(config.work_dir)
    if list(meta.get("classes", manifest.classes)) != list(manifest.classes):
        raise StoreError(f"{meta['checkpoint']} was trained on other classes than {config.work_dir}/manifest.json: "
                         "retrain, or evaluate in the work folder it was trained in")
    videos = select(manifest.by_split("test"), spec, key=lambda v: v.id)
    scorer = make_scorer(model, meta, run_config, config, device)
    ids: list[str] = []
    labels: list[int] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in scorer.strategies}
    failed: list[dict[str, str]] = []
    write_progress(config.work, "eval", spec, done=0, total=len(videos), started=started)
    with torch.inference_mode():
        for done, video in enumerate(_progress(videos, f"eval {run} {spec.name}"), start=1):
            try:
                result = scorer.score(video)
            except (StoreError, VideoError, KeyError, ValueError) as exc:
                failed.append({"video": video.id, "reason": str(exc) or type(exc).__name__})
                log.warning("eval %s: %s failed: %s", run, video.id, exc)
            else:
                ids.append(video.id)
                labels.append(video.label)
                for name in scorer.strategies:
                    scores[name].append(result[name])
            write_progress(config.work, "eval", spec, done=done, total=len(videos), failed=len(failed))
    n_classes = len(manifest.classes)
    shard = PredictionShard(
        model=meta["kind"], run=run, shard=spec, classes=tuple(manifest.classes), video_ids=ids,
        labels=np.array(labels, dtype=np.int64),
        scores={name: np.array(values, dtype=np.float32).reshape(len(ids), n_classes) for name, values in scores.items()},
        default_strategy=scorer.default, checkpoint=str(meta["checkpoint"]),
        checkpoint_sha256=sha256_file(meta["checkpoint"]),
        config={"run": run_config.to_dict(), "eval": config.to_dict()["eval"]}, code_version=code_version(),
    )
    return write_prediction_shard(config.work_dir, shard, failed=failed,
                                  extra_record={"seconds": round(time.time() - started, 3),
                                                "trained_code_version": meta.get("code_version", ""),
                                                "epoch": meta.get("epoch")})


def _progress(items: Sequence[Any], label: str) -> Any:
    from tqdm import tqdm

    return tqdm(items, desc=label, unit="video", leave=False, mininterval=1.0)


# ------------------------------------------------------------------------------ scorers and their inputs
def make_scorer(model: Any, meta: dict[str, Any], run_config: Config, config: Config, device: Any) -> Any:
    """The scorer of the checkpoint's kind, given the test videos that kind reads."""
    kind = get_kind(meta["kind"])
    inputs = feature_inputs(config, meta) if FEATURES in kind.reads else video_source(config)
    return kind.implementation().Scorer(model, meta, run_config, config, device, inputs)


def video_source(config: Config) -> EvalInputs:
    """The test videos of the extraction shards: a :class:`hpcvid.learn.datasets.ShardVideoSource` and each one's info."""
    from hpcvid.learn.datasets import ShardVideoSource
    from hpcvid.storage.shards import ShardReader

    folder = config.work_dir / "extract"
    shards = _shards_in(folder)
    if not shards:
        raise StoreError(f"no shards in {folder}: run `hpcvid run extract --work {config.work}` first")
    shard_of, info = {}, {}
    for path in shards:
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                if reader.info(vid).get("split") == "test":
                    shard_of[vid] = str(path)
                    info[vid] = reader.info(vid)
    return EvalInputs(ShardVideoSource(shard_of), info)


def feature_inputs(config: Config, meta: dict[str, Any]) -> EvalInputs:
    """The feature set the run was trained on, from the shards of the folder it was trained on."""
    from hpcvid.learn.datasets import ShardFeatureSource

    folder = Path(meta.get("feature_folder") or config.work_dir / "extract")
    shards = _shards_in(folder)
    if not shards:
        raise StoreError(f"no feature shards in {folder} (the folder the {meta['kind']} model was trained on): "
                         "re-run extraction or `hpcvid run features`")
    source = ShardFeatureSource(shards, meta["feature_set"])
    return EvalInputs(source, {item.id: item for item in source.items})


def _shards_in(folder: Path) -> list[Path]:
    """Every shard file in ``folder`` (hidden partial files excluded)."""
    return sorted(p for p in folder.glob("shard-*-of-*.h5") if not p.name.startswith("."))
