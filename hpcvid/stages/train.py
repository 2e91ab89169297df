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
import contextlib
import logging
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from hpcvid.config import Config
from hpcvid.errors import StoreError
from hpcvid.fileio import atomic_write_json
from hpcvid.launch.distributed import detect
from hpcvid.launch.sharding import ShardSpec
from hpcvid.learn.backbones import BACKBONES
from hpcvid.learn.checkpoints import read_metrics, run_dir
from hpcvid.learn.kinds import FEATURES, FLOW, FRAMES, KINDS, DataBundle, TrainInputs, get_kind, kind_names, kinds_help
from hpcvid.workfolder import Unit, WorkFolder, planning_only

if TYPE_CHECKING:      # the trainer is imported when training starts: `run features` reads this module's paths
    from hpcvid.learn.trainer import DataFactory, Trainer

log = logging.getLogger(__name__)

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
    parser.add_argument("--backbone", choices=(*BACKBONES, "small"), help="CNN trunk (small: a 4-layer CNN for CPUs)")
    parser.add_argument("--weights", metavar="FILE", help="local backbone weights; empty = random init")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where to train")
    parser.add_argument("--workers", type=int, metavar="W",
                        help="DataLoader workers per process; -1 (default) = from the task's cores")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="also write TensorBoard event files into the run folder (needs hpcvid[tensorboard])")


def overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"train.model": args.model, "train.procs": args.procs, "train.epochs": args.epochs,
            "train.batch_size": args.batch_size, "train.lr": args.lr, "train.weight_decay": args.weight_decay,
            "train.dropout": args.dropout, "train.backbone": args.backbone,
            "train.weights": args.weights, "train.device": args.device, "train.workers": args.workers,
            "train.tensorboard": args.tensorboard}


def unit(config: Config) -> Unit:
    return Unit("train", config.train.model)


def plan(config: Config, only: int | None = None, force: bool = False) -> list[ShardSpec]:
    """A run is one unit of work; a rerun resumes from its newest checkpoint (one that is done trains nothing).

    Checked here, on the login node, so a job never waits in the queue to fail on them: the work folder
    exists, a weights file given exists, TensorBoard is there when asked for. ``--force`` starts the run
    over: its folder is set aside.
    """
    work = WorkFolder.of(config).require("train")
    if config.train.weights:
        from hpcvid.learn.backbones import require_weights_file

        require_weights_file(config.train.weights, config.train.backbone)
    if config.train.tensorboard and not config.launch.container:   # a container brings its own packages
        from hpcvid.tensorboard_log import require_tensorboard

        require_tensorboard()
    if force and not planning_only():
        _set_aside(work.run_dir(config.train.model))
    return [ShardSpec(0, 1, force)]


def _set_aside(run: Path) -> None:
    """--force starts a run over: the old run folder is renamed (never deleted: weeks of training)."""
    if run.is_dir() and any(run.iterdir()):
        aside = run.with_name(f"{run.name}.replaced-{time.strftime('%Y%m%dT%H%M%S')}")
        run.rename(aside)
        log.warning("--force: %s moved to %s; the run starts over", run, aside)


def run_shard(config: Config, spec: ShardSpec) -> dict[str, Any]:
    """Train the run in this process as the rank its launcher gave it (or in ``train.procs`` local processes).

    Rank 0 holds the run's lock and writes its record (``run.json``) when training ends.
    """
    from hpcvid.learn.trainer import spawn_local
    from hpcvid.version import code_version

    env = detect()
    work = WorkFolder.of(config)
    lock = work.lock(unit(config), spec) if env.is_main else contextlib.nullcontext()
    with lock:
        if config.train.procs > 1 and not env.is_distributed:
            spawn_local(config, config.train.procs, load_data)
        else:
            TrainJob(config)()
        if not env.is_main:
            return {}
        history = read_metrics(run_dir(config))
        record = {"run": config.train.model, "model": config.train.model, "epochs": len(history),
                  "best_val_loss": min((h["val_loss"] for h in history if h.get("val_loss") == h.get("val_loss")),
                                       default=None),
                  "last": history[-1] if history else {}, "code_version": code_version()}
        atomic_write_json(work.record_file(unit(config), spec), record)
    return record


def report(config: Config, records: Sequence[dict[str, Any]]) -> int:
    """Where the run is and how its last epoch went."""
    for record in records:
        if not record:
            continue
        last = record.get("last", {})
        print(f"{record['model']}: {record['epochs']} epochs in {run_dir(config)}; last val_loss "
              f"{last.get('val_loss', float('nan')):.4f}, val_acc {last.get('val_acc', float('nan')):.3f}")
    return 0


# ============================================================================== submitit entry point
class TrainJob:
    """What each rank of a training job runs (the stage's ``run_shard`` calls it; a submitit Checkpointable).

    ``__call__`` trains in this process with the rank from :func:`hpcvid.launch.distributed.detect`, on
    :func:`load_data` unless another ``data_factory`` is given (tests). On the pre-timeout signal submitit's
    handler is deferred to the end of the current optimiser step, a checkpoint of that step is written, and
    then the handler requeues the job (``checkpoint``), which resumes from it.
    """

    def __init__(self, config: Config, data_factory: DataFactory | None = None) -> None:
        self.config = config
        self.data_factory = data_factory
        self._trainer: Trainer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "data_factory": self.data_factory, "_trainer": None}

    def __call__(self) -> dict[str, Any]:
        from hpcvid.launch.executors import exit_without_collecting
        from hpcvid.learn.trainer import Trainer

        exit_without_collecting()      # a job's process, or a command that ends after training
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


def _shard_files(config: Config, source: Unit) -> list[Path]:
    """The shard files of the current, complete set of ``source`` (checked against their records)."""
    return WorkFolder.of(config).current_shards(source)


def _trained_on(config: Config, source: Unit) -> dict[str, str]:
    """Which set the run trains on, for its checkpoints: evaluation refuses the run once that set is replaced."""
    current = WorkFolder.of(config).current_set(source)
    return {"unit": str(source), "set": current.id if current else ""}


def _classes(config: Config) -> list[str]:
    from hpcvid.storage.manifest import load_manifest

    return list(load_manifest(config.work_dir).classes)


def train_videos(config: Config, reads: tuple[str, ...]) -> TrainInputs:
    """The train-split videos of the extraction shards that hold what the model ``reads`` (frames, flow)."""
    from hpcvid.learn.datasets import ShardVideoSource, VideoItem
    from hpcvid.storage.shards import ShardReader

    needed = [flag for part, flag in ((FRAMES, "has_frames"), (FLOW, "has_flow")) if part in reads]
    items, shard_of = [], {}
    for path in _shard_files(config, Unit("extract")):
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                info = reader.info(vid)
                if info.get("split") != "train" or not all(info[flag] for flag in needed):
                    continue
                items.append(VideoItem(vid, int(info["label"]), int(info["frames"]), "train"))
                shard_of[vid] = str(path)
    if not items:
        raise StoreError(f"the extraction shards of {config.work} hold no train-split videos with "
                         f"{' and '.join(reads)}: re-extract with extract.flow (and frames) enabled")
    return TrainInputs(ShardVideoSource(shard_of), items, _classes(config),
                       trained_on=_trained_on(config, Unit("extract")))


def feature_source(config: Config) -> tuple[Any, str, Unit]:
    """The features a feature model reads and their name, in this order of preference:

    1. the fine-tuned set (``run features``, unit ``features/<frame run>``): its merged file when it was merged
       from the current set, else its shards;
    2. the extracted set (``extract.backbone``, or ``train.features``): WORK/features.h5 when it was merged
       from the current extraction, else the extraction shards.
    A merged file brings the train-split mean/std; from shards they are computed over the training videos.
    Returns (source, feature name, the unit whose shards hold the features).
    """
    from hpcvid.learn.datasets import MergedFeatureSource, ShardFeatureSource
    from hpcvid.stages import features

    work = WorkFolder.of(config)
    wanted = config.train.features
    fine = features.unit(config)          # the features of the frame run that train.checkpoint names
    if wanted in ("", FINETUNED_FEATURES) and work.current_set(fine) is not None:
        merged = _current_merged(work, fine)
        if merged is not None:
            return MergedFeatureSource(merged, FINETUNED_FEATURES), FINETUNED_FEATURES, fine
        return ShardFeatureSource(_shard_files(config, fine), FINETUNED_FEATURES), FINETUNED_FEATURES, fine
    if wanted == FINETUNED_FEATURES:
        raise StoreError(f"no fine-tuned features in {work.unit_dir(fine)}: run `hpcvid run features` (with the "
                         "same train.checkpoint) first")
    name = wanted or config.extract.backbone
    extract = Unit("extract")
    merged = _current_merged(work, extract)
    if merged is not None:
        return MergedFeatureSource(merged, name), name, extract
    return ShardFeatureSource(_shard_files(config, extract), name), name, extract


def _current_merged(work: WorkFolder, source: Unit) -> Path | None:
    """The merged file of ``source`` when it was built from the current set (else None, with a warning)."""
    from hpcvid.fileio import read_json

    merged, record = work.merged_file(source), work.merged_record(source)
    if not (merged.is_file() and record.is_file()):
        return None
    current = work.current_set(source)
    made = read_json(record)
    if current is None or made.get("set") != current.id:
        log.warning("%s was merged from another %s set than the current one: reading the shards instead "
                    "(`hpcvid run merge --force` rebuilds it)", merged, source)
        return None
    features_dir = "" if source.stage == "extract" else f" --features-dir {work.unit_dir(source)}"
    work.verify(merged, made["sha256"], fix=f"rebuild it with `hpcvid run merge{features_dir} --force`")
    return merged


def train_features(config: Config) -> TrainInputs:
    """The train-split videos of :func:`feature_source`."""
    source, name, feature_unit = feature_source(config)
    items = [it for it in source.items if it.split == "train"]
    if not items:
        raise StoreError(f"no train-split videos with features {name!r} in {config.work}: extract with a backbone")
    return TrainInputs(source, items, _classes(config), feature_set=name,
                       trained_on=_trained_on(config, feature_unit))
