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
and resumed ends with the same weights as an uninterrupted one: randomness is reseeded from ``(seed, epoch,
rank)`` at each epoch and data randomness comes from ``(seed, epoch, index)``.

This module decides which files a model reads (:func:`load_data`): the extraction shards for frames and
flow, the fine-tuned or extracted features for feature models. It opens them and hands them to the kind's
module, which builds the datasets. The trainer below reads top to bottom: data -> model ->
optimiser/schedule -> resume -> DDP -> epoch loop -> checkpoint + metrics; what differs between models
comes from the kind's module. torch is imported inside functions only.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hpcvid.config import Config, write_resolved
from hpcvid.errors import CheckpointError, ConfigError, StoreError
from hpcvid.fileio import remove_stale_partials
from hpcvid.launch.distributed import DistEnv, detect
from hpcvid.learn.checkpoints import (BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_compatible,
                                      checkpoint_name, list_checkpoints, newest_valid_checkpoint, pick_checkpoint,
                                      read_metrics, run_dir, save_checkpoint, write_metrics)
from hpcvid.learn.kinds import (FEATURES, FLOW, FRAMES, KINDS, DataBundle, StepTools, TrainInputs, get_kind, kind_names,
                                kinds_help)

log = logging.getLogger(__name__)

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


# ============================================================================== the trainer
DataFactory = Callable[[Config], DataBundle]


def train(config: Config, data_factory: DataFactory, env: DistEnv | None = None) -> dict[str, Any]:
    """Train ``config.train.model`` on ``data_factory(config)`` in this process as rank ``env.rank``."""
    return Trainer(config, env or detect(), data_factory).fit()


def spawn_local(config: Config, procs: int, data_factory: DataFactory) -> None:
    """Start ``procs`` processes on this machine (spawn, gloo) with RANK/WORLD_SIZE/MASTER_* set."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_spawned_rank, args=(procs, port, config, data_factory), nprocs=procs,
                       start_method="spawn", join=True)


def _spawned_rank(rank: int, world: int, port: int, config: Config, data_factory: DataFactory) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1", master_port=port)
    env.export()
    train(config, data_factory, env)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    wait: float = 0.0
    elapsed: float = 0.0


class Trainer:
    def __init__(self, config: Config, env: DistEnv, data_factory: DataFactory) -> None:
        self.config = config
        self.env = env
        self.data_factory = data_factory
        self.kind = get_kind(config.train.model)
        self.run = run_dir(config)
        self.stop_callback: Callable[[], None] | None = None
        self.at_safe_point = False
        self.saved_position: tuple[int, int] | None = None
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.best_val = math.inf
        self.bad_epochs = 0

    # -------------------------------------------------------------- the run, top to bottom
    def fit(self) -> dict[str, Any]:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self._setup_distributed()
        self._prepare_run_folder()
        self.impl = self.kind.implementation()
        self.bundle = self.data_factory(self.config)
        self._build_model()
        self._build_optimiser()
        skip = self._resume()
        if self.env.is_distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.model, device_ids=ids)
        t = self.config.train
        stopped_early = bool(t.early_stopping and self.bad_epochs >= t.early_stopping)   # a rerun stays stopped
        finished = False
        try:
            while self.epoch < t.epochs and not stopped_early:
                if skip == 0:
                    _seed_epoch(t.seed, self.epoch, self.env.rank)
                train_stats = self.train_epoch(skip)
                skip = 0
                val_loss, val_acc = self.validate()
                stopped_early = self._end_epoch(train_stats, val_loss, val_acc)
                self._maybe_stop()
            finished = True
        finally:
            if self.env.is_distributed and dist.is_initialized():
                if finished:       # a rank leaving on a signal or an error must not wait for the others
                    dist.barrier()
                dist.destroy_process_group()
        return {"run": str(self.run), "epochs": self.epoch, "history": self.history, "stopped_early": stopped_early}

    # -------------------------------------------------------------- setup
    def _setup_distributed(self) -> None:
        import torch
        import torch.distributed as dist

        from hpcvid.learn.backbones import pick_device

        t = self.config.train
        self.device = pick_device(t.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.env.local_rank % max(1, torch.cuda.device_count()))
            torch.cuda.set_device(self.device)
        if self.env.is_distributed and not dist.is_initialized():
            self.env.export()
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, init_method="env://", rank=self.env.rank,
                                    world_size=self.env.world_size)
        if t.batch_size % self.env.world_size:
            raise ConfigError(f"train.batch_size = {t.batch_size} is the GLOBAL batch; it must be divisible by "
                              f"the {self.env.world_size} processes")

    def _prepare_run_folder(self) -> None:
        from hpcvid.storage.predictions import code_version

        self.code_version = code_version()
        if self.env.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.run)
            write_resolved(self.config, self.run, argv=sys.argv)

    # -------------------------------------------------------------- model, optimiser, schedule
    def _build_model(self) -> None:
        import torch

        self.init_args = self.impl.init_args(self.config, self.bundle)
        torch.manual_seed(self.config.train.seed)                # the same initial weights on every rank
        self.model = self.impl.MODEL(**self.init_args)
        if self.config.train.init_from_runs and self.kind.starts_from:
            self._warm_start()
        self.model.to(self.device)

    def _warm_start(self) -> None:
        """Hand the kind the trained runs it starts from (best.pt, else the newest valid checkpoint)."""
        found = {}
        for kind in self.kind.starts_from:
            folder = run_dir(self.config, kind)
            picked = pick_checkpoint(folder)
            if picked is None:
                log.warning("%s: no trained %s run in %s; its part starts from scratch", self.kind.name, kind, folder)
            else:
                found[kind] = picked
        self.impl.warm_start(self.model, found)

    def _build_optimiser(self) -> None:
        import torch

        t = self.config.train
        params = [p for p in self.model.parameters() if p.requires_grad]
        if t.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
        self.per_rank_batch = t.batch_size // self.env.world_size
        self.steps_per_epoch = self._steps_per_epoch()
        self.scheduler = self._scheduler()
        self.use_amp = bool(t.amp and self.device.type == "cuda")
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.tools = StepTools(backward=lambda loss: self.scaler.scale(loss).backward(),
                               optimiser_step=self._optimiser_step, autocast=self._autocast)

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (what the cyclic schedule counts in)."""
        samples = math.ceil(len(self.bundle.train) / self.env.world_size)
        batches = math.ceil(samples / self.per_rank_batch)
        return batches * self.impl.steps_per_batch(self.config)

    def _scheduler(self) -> Any:
        import torch

        t = self.config.train
        if t.schedule == "cyclic":
            half = max(1, int(round(t.cycle_epochs * self.steps_per_epoch)))
            return torch.optim.lr_scheduler.CyclicLR(self.optimizer, base_lr=min(t.lr_min, t.lr), max_lr=t.lr,
                                                     step_size_up=half, mode="triangular2",
                                                     cycle_momentum=t.optimizer == "sgd")
        if t.schedule == "plateau":
            return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=t.plateau_factor,
                                                              patience=t.plateau_patience, eps=0.0)
        return None

    # -------------------------------------------------------------- resume
    def _resume(self) -> int:
        """Load the newest valid checkpoint; returns the samples to skip in the current epoch."""
        import numpy as np
        import torch

        existing = list_checkpoints(self.run)
        found = newest_valid_checkpoint(self.run)
        if found is None:
            if existing:
                raise CheckpointError(f"every checkpoint in {self.run} is corrupt "
                                      f"({', '.join(p.name for p in existing)}): restore one, or move them away "
                                      "to start the run over")
            return 0
        path, payload = found
        if self.env.is_main:
            for newer in existing[existing.index(path) + 1:]:     # corrupt ones: set aside, never pruned into
                newer.rename(newer.with_name(newer.name + ".corrupt"))
                log.warning("set aside corrupt checkpoint %s (resuming from %s)", newer, path.name)
        check_compatible(payload, path, self.kind.name, self.init_args)
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.scheduler is not None and payload.get("scheduler") is not None:
            self.scheduler.load_state_dict(payload["scheduler"])
        if self.use_amp and payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch, self.step_in_epoch = int(payload["epoch"]), int(payload["step"])
        self.global_step = int(payload.get("global_step", 0))
        self.best_val, self.bad_epochs = float(payload["best_val"]), int(payload["bad_epochs"])
        self.history = list(payload.get("history", []))
        if self.step_in_epoch and payload.get("world_size") != self.env.world_size:
            raise CheckpointError(f"checkpoint {path} was written mid-epoch by {payload.get('world_size')} "
                                  f"processes; resume it with the same number (now {self.env.world_size})")
        if self.step_in_epoch:     # mid-epoch: continue the same random streams
            rng = payload["rng"]
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            random.setstate(_python_state_from(rng["python"]))
            np.random.set_state((rng["numpy"][0], np.asarray(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        self.saved_position = (self.epoch, self.step_in_epoch)
        if self.env.is_main:
            log.info("resuming %s from %s (epoch %d, step %d)", self.kind.name, path, self.epoch,
                     self.step_in_epoch)
        return (self.step_in_epoch // self.impl.steps_per_batch(self.config)) * self.per_rank_batch

    # -------------------------------------------------------------- one epoch
    def _loader(self, dataset: Any, sampler: Any) -> Any:
        import torch
        from torch.utils.data import DataLoader

        workers = self.config.train.workers
        # its own generator: creating the iterator must not draw from the global stream (dropout), or a
        # resume in the middle of an epoch would shift every random number after it
        generator = torch.Generator().manual_seed(self.config.train.seed + self.epoch)
        return DataLoader(dataset, batch_size=self.per_rank_batch, sampler=sampler, num_workers=workers,
                          generator=generator,
                          pin_memory=self.device.type == "cuda", persistent_workers=False,
                          multiprocessing_context="spawn" if workers and sys.platform == "darwin" else None)

    def train_epoch(self, skip: int = 0) -> EpochStats:
        """One pass over this rank's share of the training set (the first ``skip`` samples already done)."""
        from torch.utils.data.distributed import DistributedSampler

        dataset = self.bundle.train
        dataset.set_epoch(self.epoch)
        sampler = DistributedSampler(dataset, num_replicas=self.env.world_size, rank=self.env.rank,
                                     shuffle=True, seed=self.config.train.seed, drop_last=False)
        sampler.set_epoch(self.epoch)
        loader = self._loader(dataset, _SkipSampler(sampler, skip))
        self.model.train()
        stats = EpochStats()
        start = time.perf_counter()
        waited_since = time.perf_counter()
        for batch in loader:
            stats.wait += time.perf_counter() - waited_since
            *inputs, labels = [b.to(self.device, non_blocking=True) for b in batch]
            self.at_safe_point = False
            self.optimizer.zero_grad(set_to_none=True)
            loss, correct = self.impl.train_step(self.model, inputs, labels, self.config, self.tools)
            self.at_safe_point = True
            stats.loss_sum += loss * len(labels)
            stats.correct += correct
            stats.count += len(labels)
            self._maybe_stop()
            waited_since = time.perf_counter()
        stats.elapsed = time.perf_counter() - start
        return _all_reduce_stats(stats, self.env, self.device)

    def _autocast(self) -> Any:
        import torch

        if self.use_amp:
            return torch.autocast("cuda", dtype=torch.float16)
        return contextlib.nullcontext()

    def _optimiser_step(self) -> None:
        import torch

        clip = self.config.train.clip_grad
        if clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.scheduler is not None and not isinstance(self.scheduler, _plateau_type()):
            self.scheduler.step()
        self.global_step += 1
        self.step_in_epoch += 1

    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the held-out part of the train split, every video counted exactly once."""
        import torch

        dataset = self.bundle.val
        if dataset is None or len(dataset) == 0:
            return float("nan"), float("nan")
        dataset.set_epoch(self.epoch)
        mine = list(range(self.env.rank, len(dataset), self.env.world_size))     # disjoint, no padding
        loader = self._loader(dataset, mine)
        self.model.eval()
        stats = EpochStats()
        with torch.no_grad():
            for batch in loader:
                *inputs, labels = [b.to(self.device) for b in batch]
                with self._autocast():
                    output = self.model(*inputs)
                loss, logits = self.impl.validation_loss(output, labels, self.config)
                stats.loss_sum += float(loss) * len(labels)
                stats.correct += float((logits.argmax(-1) == labels).sum())
                stats.count += len(labels)
        total = _all_reduce_stats(stats, self.env, self.device)
        if total.count != len(dataset):
            raise RuntimeError(f"validation counted {total.count} videos, expected {len(dataset)}")
        return total.loss_sum / total.count, total.correct / total.count

    # -------------------------------------------------------------- end of an epoch: checkpoint + metrics
    def _end_epoch(self, stats: EpochStats, val_loss: float, val_acc: float) -> bool:
        t = self.config.train
        monitored = val_loss if not math.isnan(val_loss) else stats.loss_sum / max(stats.count, 1)
        improved = monitored < self.best_val - 1e-12
        self.best_val, self.bad_epochs = (monitored, 0) if improved else (self.best_val, self.bad_epochs + 1)
        if isinstance(self.scheduler, _plateau_type()):
            self.scheduler.step(monitored)
        self.epoch += 1
        self.step_in_epoch = 0
        self.history.append({
            "epoch": self.epoch, "step": self.global_step,
            "train_loss": stats.loss_sum / max(stats.count, 1), "train_acc": stats.correct / max(stats.count, 1),
            "val_loss": val_loss, "val_acc": val_acc, "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": stats.count / max(stats.elapsed, 1e-9),
            "data_wait_share": stats.wait / max(stats.elapsed, 1e-9),
            "train_samples": int(stats.count), "world_size": self.env.world_size, "time": time.time(),
        })
        self.save(best=improved)
        if self.env.is_main:
            h = self.history[-1]
            log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f samples/s",
                     self.epoch, t.epochs, h["train_loss"], h["train_acc"], val_loss, val_acc, h["samples_per_s"])
        return bool(t.early_stopping and self.bad_epochs >= t.early_stopping)

    def _payload(self) -> dict[str, Any]:
        import numpy as np
        import torch

        from hpcvid.learn.models import unwrap

        meta = {}
        for key, value in self.bundle.meta.items():
            meta[key] = torch.from_numpy(np.asarray(value)) if isinstance(value, np.ndarray) else value
        np_state = np.random.get_state()
        return {
            "format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
            "kind": self.kind.name, "init_args": self.init_args,
            "model": {k: v.detach().cpu() for k, v in unwrap(self.model).state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.use_amp else None,
            "epoch": self.epoch, "step": self.step_in_epoch, "global_step": self.global_step,
            "best_val": self.best_val, "bad_epochs": self.bad_epochs, "history": self.history,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                    "python": _python_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "world_size": self.env.world_size, "meta": meta,
            "config": self.config.to_dict(), "code_version": self.code_version,
        }

    def save(self, best: bool = False) -> None:
        """Rank 0 writes the current position (epoch, step) atomically; metrics.jsonl follows from history."""
        if not self.env.is_main:
            return
        payload = self._payload()
        save_checkpoint(self.run, payload, checkpoint_name(self.epoch, self.step_in_epoch),
                        keep=self.config.train.keep_checkpoints)
        if best:
            save_checkpoint(self.run, payload, BEST_NAME)
        write_metrics(self.run, self.history)
        self.saved_position = (self.epoch, self.step_in_epoch)

    # -------------------------------------------------------------- stopping between steps (walltime)
    def save_if_safe(self) -> None:
        """Pre-timeout: write a checkpoint of the last finished step, unless one was just written."""
        if self.at_safe_point and self.saved_position != (self.epoch, self.step_in_epoch):
            self.save()

    def request_stop(self, callback: Callable[[], None]) -> None:
        self.stop_callback = callback

    def _maybe_stop(self) -> None:
        if self.stop_callback is not None:
            callback, self.stop_callback = self.stop_callback, None
            self.save_if_safe()
            callback()          # submitit's handler: checkpoint() sees the file, requeues and exits


class _SkipSampler:
    """Yields a sampler's indices after the first ``skip`` (resuming mid-epoch on the same order)."""

    def __init__(self, base: Any, skip: int) -> None:
        self.base, self.skip = base, skip

    def __iter__(self) -> Any:
        import itertools

        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.base) - self.skip)


def _plateau_type() -> type:
    import torch

    return torch.optim.lr_scheduler.ReduceLROnPlateau


def _seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Dropout and other torch randomness of an epoch depend on (seed, epoch, rank) only."""
    import numpy as np
    import torch

    value = (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31 - 1)
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value)


def _python_rng_state() -> list[Any]:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _python_state_from(saved: list[Any]) -> tuple[Any, ...]:
    return (saved[0], tuple(saved[1]), saved[2])


def _all_reduce_stats(stats: EpochStats, env: DistEnv, device: Any = "cpu") -> EpochStats:
    """Sum loss, correct and count over ranks; time is the slowest rank's."""
    if not env.is_distributed:
        return stats
    import torch
    import torch.distributed as dist

    sums = torch.tensor([stats.loss_sum, stats.correct, stats.count, stats.wait], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    elapsed = torch.tensor([stats.elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return EpochStats(float(sums[0]), float(sums[1]), float(sums[2]), float(sums[3]) / env.world_size,
                      float(elapsed[0]))
