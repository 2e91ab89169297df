"""The ``train`` stage: which data a model trains on, and how the trainer is started here or on SLURM.

Run manual::

    hpcvid run train --config jobs/synthetic.toml --model lstm               # one process
    hpcvid run train --config jobs/synthetic.toml --model flow --procs 2     # 2 local processes, gloo
    hpcvid submit train --config jobs/ucf101.toml --model lstm --nodes 2 ... # SLURM: TrainJob per task

``--model`` is any kind of :data:`hpcvid.learn.kinds.KINDS`. Everything lands in ``WORK/runs/<model>/``:

* ``ckpt-eEEEE-sSSSSSSS.pt`` - checkpoints written atomically by rank 0 after every epoch (``s`` = 0) and
  on the pre-timeout signal (``s`` = optimiser steps into the epoch). They hold model, optimiser, scheduler,
  AMP scaler, epoch/step, RNG states, early-stopping state, the metric history, the resolved config, the
  model's constructor arguments and the code version. Loaded with ``weights_only=True``.
* ``best.pt`` - the checkpoint with the lowest validation loss (what evaluation loads by default).
* ``metrics.jsonl`` - one line per epoch (rewritten atomically from the checkpoint's history, so it never
  disagrees with the checkpoint after a kill).
* ``config.resolved.json`` - the resolved config and the command line.

A rerun resumes from the newest valid checkpoint; a corrupt one is skipped with a warning, an incompatible
one (other model or architecture) is refused with a message that says what differs. A run killed mid-epoch
and resumed ends with the same weights as an uninterrupted one (:mod:`hpcvid.learn.trainer`).

This module decides which files a model reads (:func:`load_data`): the extraction shards for frames and
flow, the fine-tuned or extracted features for feature models. It opens them and hands them to the kind's
module, which builds the datasets; the loop itself is :mod:`hpcvid.learn.trainer`. torch is imported
inside functions only.
"""
from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpcvid.config import Config
from hpcvid.errors import StoreError
from hpcvid.launch.distributed import DistEnv, detect
from hpcvid.learn.checkpoints import read_metrics, run_dir
from hpcvid.learn.kinds import FEATURES, FLOW, FRAMES, KINDS, DataBundle, TrainInputs, get_kind, kind_names, kinds_help

if TYPE_CHECKING:      # the trainer is imported when training starts: `run features` reads this module's paths
    from hpcvid.learn.trainer import DataFactory, Trainer

HELP = f"train a model ({', '.join(KINDS)}) into WORK/runs/<model>/"
FINETUNED_FEATURES = "finetuned"


# ============================================================================== the stage (CLI) part
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=kind_names(), help=f"which model to train: {kinds_help()}")
    parser.add_argument("--procs", type=int, metavar="N", help="local processes (torch.distributed, gloo)")
    parser.add_argument("--epochs", type=int, metavar="E", help="epochs in total (a resumed run continues to E)")
    parser.add_argument("--batch-size", type=int, metavar="B", help="GLOBAL batch size (split over processes)")
    parser.add_argument("--lr", type=float, help="learning rate (the upper bound of the cyclic schedule)")
    parser.add_argument("--weight-decay", type=float, metavar="WD", help="AdamW/SGD weight decay")
    parser.add_argument("--dropout", type=float, metavar="P", help="dropout before the classifier (and between LSTM layers)")
    parser.add_argument("--backbone", choices=("resnet18", "googlenet", "small"), help="CNN trunk")
    parser.add_argument("--weights", metavar="FILE", help="local backbone weights; empty = random init")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train")
    parser.add_argument("--workers", type=int, metavar="W", help="DataLoader workers per process")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.model": args.model, "train.procs": args.procs, "train.epochs": args.epochs,
            "train.batch_size": args.batch_size, "train.lr": args.lr, "train.weight_decay": args.weight_decay,
            "train.dropout": args.dropout, "train.backbone": args.backbone,
            "train.weights": args.weights, "train.device": args.device, "train.workers": args.workers}


def run_local(config: Config, args: argparse.Namespace | None = None) -> int:
    """``hpcvid run train``: train here, in ``train.procs`` processes, and print where the run is."""
    from hpcvid.learn.trainer import spawn_local, train

    if config.train.procs > 1:
        spawn_local(config, config.train.procs, load_data)
    else:
        train(config, load_data, DistEnv())
    summary = read_metrics(run_dir(config))
    last = summary[-1] if summary else {}
    print(f"{config.train.model}: {len(summary)} epochs in {run_dir(config)}; last val_loss "
          f"{last.get('val_loss', float('nan')):.4f}, val_acc {last.get('val_acc', float('nan')):.3f}")
    return 0


# ============================================================================== submitit entry point
class TrainJob:
    """What ``hpcvid submit train`` hands to submitit: one instance per SLURM task (= one rank).

    ``__call__`` trains in this process with the rank from :func:`hpcvid.launch.distributed.detect`, on
    :func:`load_data` unless another ``data_factory`` is given (tests).
    ``checkpoint`` is called by submitit on the pre-timeout signal (rank 0 only): the signal is deferred to
    the end of the current optimiser step, a checkpoint of that step is written, and the returned
    DelayedSubmission requeues the job, which then resumes from it.
    """

    def __init__(self, config: Config, data_factory: DataFactory | None = None) -> None:
        self.config = config
        self.data_factory = data_factory
        self._trainer: Trainer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "data_factory": self.data_factory, "_trainer": None}

    def __call__(self) -> dict[str, Any]:
        from hpcvid.learn.trainer import Trainer

        trainer = Trainer(self.config, detect(), self.data_factory or load_data)
        self._trainer = trainer
        self._defer_signal(signal.SIGUSR2, trainer)
        return trainer.fit()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        if self._trainer is not None:
            self._trainer.save_if_safe()
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.data_factory))

    @staticmethod
    def _defer_signal(signum: int, trainer: Trainer) -> None:
        """Route a handler installed by submitit through the trainer, which calls it between steps."""
        previous = signal.getsignal(signum)
        if not callable(previous):
            return

        def deferred(sig: int, frame: Any) -> None:
            trainer.request_stop(lambda: previous(sig, frame))

        signal.signal(signum, deferred)


# ============================================================================== which data a model reads
def load_data(config: Config) -> DataBundle:
    """The data bundle of ``config.train.model``: this stage opens the files, the kind builds the datasets."""
    kind = get_kind(config.train.model)
    inputs = train_features(config) if FEATURES in kind.reads else train_videos(config, kind.reads)
    return kind.implementation().build_data(config, inputs)


def _shard_files(folder: Path) -> list[Path]:
    """The shard files of the newest complete set of shard records in ``folder`` (as merge chooses them)."""
    from hpcvid.fileio import read_json
    from hpcvid.stages.merge import find_shard_records

    return [folder / read_json(record)["file"] for record in find_shard_records(folder)]


def _classes(config: Config) -> list[str]:
    from hpcvid.storage.manifest import load_manifest

    return list(load_manifest(config.work_dir).classes)


def train_videos(config: Config, reads: tuple[str, ...]) -> TrainInputs:
    """The train-split videos of the extraction shards that hold what the model ``reads`` (frames, flow)."""
    from hpcvid.learn.datasets import ShardVideoSource, VideoItem
    from hpcvid.storage.shards import ShardReader

    folder = config.work_dir / "extract"
    needed = [flag for part, flag in ((FRAMES, "has_frames"), (FLOW, "has_flow")) if part in reads]
    items, shard_of = [], {}
    for path in _shard_files(folder):
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                info = reader.info(vid)
                if info.get("split") != "train" or not all(info[flag] for flag in needed):
                    continue
                items.append(VideoItem(vid, int(info["label"]), int(info["frames"]), "train"))
                shard_of[vid] = str(path)
    if not items:
        raise StoreError(f"the shards in {folder} hold no train-split videos with {' and '.join(reads)}: "
                         "re-extract with extract.flow (and frames) enabled")
    return TrainInputs(ShardVideoSource(shard_of), items, _classes(config))


def refeature_dir(work: Path | str) -> Path:
    """Where ``run features`` writes the fine-tuned frame CNN's per-frame features (same shard layout)."""
    return Path(work) / "features" / "frame"


def feature_source(config: Config) -> tuple[Any, str, Path]:
    """The features a feature model reads and their name, in this order of preference:

    1. the fine-tuned set (``run features``): merged ``WORK/features/frame/features.h5``, else its shards;
    2. the extracted set (``extract.backbone``, or ``train.features``): merged ``WORK/features.h5``, else
       the extract shards.
    A merged file brings the train-split mean/std; from shards they are computed over the training videos.
    Returns (source, feature name, the folder of the shards that hold the features).
    """
    from hpcvid.learn.datasets import MergedFeatureSource, ShardFeatureSource

    wanted = config.train.features
    fine = refeature_dir(config.work_dir)
    if wanted in ("", FINETUNED_FEATURES) and ((fine / "features.h5").is_file() or list(fine.glob("shard-*.json"))):
        if (fine / "features.h5").is_file():
            return MergedFeatureSource(fine / "features.h5", FINETUNED_FEATURES), FINETUNED_FEATURES, fine
        return ShardFeatureSource(_shard_files(fine), FINETUNED_FEATURES), FINETUNED_FEATURES, fine
    if wanted == FINETUNED_FEATURES:
        raise StoreError(f"no fine-tuned features in {fine}: run `hpcvid run features --checkpoint "
                         f"{config.work_dir / 'runs' / 'frame'}` first")
    name = wanted or config.extract.backbone
    merged = config.work_dir / "features.h5"
    extracted = config.work_dir / "extract"
    if merged.is_file():
        return MergedFeatureSource(merged, name), name, extracted
    return ShardFeatureSource(_shard_files(extracted), name), name, extracted


def train_features(config: Config) -> TrainInputs:
    """The train-split videos of :func:`feature_source`."""
    source, name, folder = feature_source(config)
    items = [it for it in source.items if it.split == "train"]
    if not items:
        raise StoreError(f"no train-split videos with features {name!r} in {config.work}: extract with a backbone")
    return TrainInputs(source, items, _classes(config), feature_set=name, feature_folder=str(folder))
