"""The ``train`` stage: one trainer for the four models, on one process or many, surviving walltimes.

Run manual::

    hpcvid run train --config jobs/synthetic.toml --model lstm               # one process
    hpcvid run train --config jobs/synthetic.toml --model flow --procs 2     # 2 local processes, gloo
    hpcvid submit train --config jobs/ucf101.toml --model lstm --nodes 2 ... # SLURM: TrainJob per task

It reads top to bottom: data -> model -> optimiser/schedule -> resume -> DDP -> epoch loop
(:meth:`Trainer.train_epoch`, :meth:`Trainer.validate`) -> checkpoint + metrics. Everything lands in
``WORK/runs/<model>/``:

* ``ckpt-eEEEE-sSSSSSSS.pt`` - checkpoints written atomically by rank 0 after every epoch (``s`` = 0) and
  on the pre-timeout signal (``s`` = optimiser steps into the epoch). They hold model, optimiser, scheduler,
  AMP scaler, epoch/step, RNG states, early-stopping state, the metric history, the resolved config, the
  model's constructor arguments and the code version. Loaded with ``weights_only=True``.
* ``best.pt`` - the checkpoint with the lowest validation loss (what evaluation loads by default).
* ``metrics.jsonl`` - one line per epoch (rewritten atomically from the checkpoint's history, so it never
  disagrees with the checkpoint after a kill).
* ``config.resolved.json`` - the resolved config and the command line.

A rerun resumes from the newest valid checkpoint; a corrupt one is skipped with a warning, an incompatible
one (other model or architecture) is refused with a message that says what differs. Randomness is
reseeded from ``(seed, epoch, rank)`` at each epoch and data randomness comes from ``(seed, epoch, index)``,
so a run killed mid-epoch and resumed ends with the same weights as an uninterrupted one.

This module is also the stage module of ``hpcvid run train``: torch is imported inside functions only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import re
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from hpcvid.config import Config, config_from_dict, write_resolved
from hpcvid.launch.distributed import DistEnv, detect
from hpcvid.errors import CheckpointError, ConfigError, StoreError
from hpcvid.fileio import atomic_path, atomic_write_text, remove_stale_partials

log = logging.getLogger(__name__)

HELP = "train a model (frame, flow, twostream, lstm) into WORK/runs/<model>/"
CHECKPOINT_FORMAT = "hpcvid.checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINT_RE = re.compile(r"^ckpt-e(\d{4,})-s(\d{7,})\.pt$")
BEST_NAME = "best.pt"
METRICS_NAME = "metrics.jsonl"
FINETUNED_FEATURES = "finetuned"


# ============================================================================== the stage (CLI) part
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("frame", "flow", "twostream", "lstm"), help="which model to train")
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
        spawn_local(config, config.train.procs)
    else:
        train(config, DistEnv())
    summary = read_metrics(run_dir(config))
    last = summary[-1] if summary else {}
    print(f"{config.train.model}: {len(summary)} epochs in {run_dir(config)}; last val_loss "
          f"{last.get('val_loss', float('nan')):.4f}, val_acc {last.get('val_acc', float('nan')):.3f}")
    return 0


def spawn_local(config: Config, procs: int, data_factory: Callable | None = None) -> None:
    """Start ``procs`` processes on this machine (spawn, gloo) with RANK/WORLD_SIZE/MASTER_* set."""
    import torch.multiprocessing as mp

    port = _free_port()
    mp.start_processes(_spawned_rank, args=(procs, port, config, data_factory), nprocs=procs,
                       start_method="spawn", join=True)


def _spawned_rank(rank: int, world: int, port: int, config: Config, data_factory: Callable | None) -> None:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, master_addr="127.0.0.1", master_port=port)
    env.export()
    train(config, env, data_factory)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ============================================================================== submitit entry point
class TrainJob:
    """What ``hpcvid submit train`` hands to submitit: one instance per SLURM task (= one rank).

    ``__call__`` trains in this process with the rank from :func:`hpcvid.launch.distributed.detect`.
    ``checkpoint`` is called by submitit on the pre-timeout signal (rank 0 only): the signal is deferred to
    the end of the current optimiser step, a checkpoint of that step is written, and the returned
    DelayedSubmission requeues the job, which then resumes from it.
    """

    def __init__(self, config: Config, data_factory: Callable | None = None) -> None:
        self.config = config
        self.data_factory = data_factory
        self._trainer: Trainer | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "data_factory": self.data_factory, "_trainer": None}

    def __call__(self) -> dict[str, Any]:
        trainer = Trainer(self.config, detect(), self.data_factory)
        self._trainer = trainer
        self._defer_signal(signal.SIGUSR2, trainer)
        return trainer.fit()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        if self._trainer is not None:
            self._trainer.save_if_safe()
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.data_factory))

    @staticmethod
    def _defer_signal(signum: int, trainer: "Trainer") -> None:
        """Route a handler installed by submitit through the trainer, which calls it between steps."""
        previous = signal.getsignal(signum)
        if not callable(previous):
            return

        def deferred(sig: int, frame: Any) -> None:
            trainer.request_stop(lambda: previous(sig, frame))

        signal.signal(signum, deferred)


# ============================================================================== run folders, checkpoints
def run_dir(config: Config) -> Path:
    return config.work_dir / "runs" / config.train.model


def checkpoint_name(epoch: int, step: int) -> str:
    return f"ckpt-e{epoch:04d}-s{step:07d}.pt"


def list_checkpoints(folder: Path | str) -> list[Path]:
    """Checkpoints of a run, oldest first by (completed epochs, steps into the next)."""
    found = []
    for path in Path(folder).glob("ckpt-*.pt"):
        match = CHECKPOINT_RE.match(path.name)
        if match:
            found.append(((int(match.group(1)), int(match.group(2))), path))
    return [path for _, path in sorted(found)]


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; anything else than an hpcvid checkpoint is refused."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: train first (`hpcvid run train`) or check --work")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for truncated/garbled files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointError(f"checkpoint {path} is corrupt or not a torch file ({first}); delete it to resume "
                              "from an older one, or retrain") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an hpcvid checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                              "give a file from WORK/runs/<model>/")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} has version {payload.get('version')}, this hpcvid reads "
                              f"{CHECKPOINT_VERSION}: retrain, or use the hpcvid that wrote it")
    missing = [k for k in ("kind", "init_args", "model", "config", "epoch", "step") if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}: it is incomplete; retrain")
    return payload


def check_compatible(payload: dict[str, Any], path: Path, kind: str, init_args: dict[str, Any]) -> None:
    """Refuse a checkpoint whose model differs from the one this config builds (naming what differs)."""
    if payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']!r} model, not {kind!r}: "
                              "use another --work or move the run folder away")
    ignore = {"weights"}
    diffs = [f"{k}: checkpoint {payload['init_args'].get(k)!r} vs config {v!r}" for k, v in init_args.items()
             if k not in ignore and payload["init_args"].get(k) != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} was trained with another architecture ({'; '.join(diffs)}): "
                              f"restore those settings, or move {path.parent} away to start a new run")


def newest_valid_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; corrupt newer ones are skipped with a warning naming them."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            log.warning("skipping %s", error)
    return None


def save_checkpoint(folder: Path, payload: dict[str, Any], name: str, keep: int | None = None) -> Path:
    """Write atomically (temporary name, fsync, rename); keep only the newest ``keep`` epoch checkpoints."""
    import torch

    path = folder / name
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    if keep is not None:
        for old in list_checkpoints(folder)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def read_metrics(folder: Path | str) -> list[dict[str, Any]]:
    path = Path(folder) / METRICS_NAME
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_run(run: Path | str, which: str = "best", device: str = "cpu") -> tuple[Any, Config, dict[str, Any]]:
    """A trained model, ready for inference: ``(model in eval mode, resolved Config, meta)``.

    ``run`` is a run folder (``WORK/runs/<model>``) or a checkpoint file. ``which`` = "best" (lowest
    validation loss, falling back to the newest) or "last". ``meta`` holds what input preparation needs
    (see :func:`hpcvid.learn.datasets.prepare_features` / ``prepare_flow``): kind, classes, centring,
    feature_mean/feature_std (numpy), feature_set, seq_len, flow_stack, compensation, epoch, checkpoint,
    code_version.
    """
    import numpy as np

    from hpcvid.learn.models import build_from_args

    run = Path(run)
    if run.is_file():
        path, payload = run, load_checkpoint(run)
    else:
        best = run / BEST_NAME
        if which == "best" and best.is_file():
            path, payload = best, load_checkpoint(best)
        else:
            found = newest_valid_checkpoint(run)
            if found is None:
                raise CheckpointError(f"no valid checkpoint in {run}: train first with "
                                      f"`hpcvid run train --model {run.name} --work WORK`")
            path, payload = found
    model = build_from_args(payload["kind"], payload["init_args"])
    model.load_state_dict(payload["model"])
    model.to(device).eval()
    meta = dict(payload.get("meta", {}))
    for key in ("feature_mean", "feature_std"):
        if meta.get(key) is not None:
            meta[key] = np.asarray(meta[key].numpy() if hasattr(meta[key], "numpy") else meta[key])
    meta.update({"kind": payload["kind"], "epoch": payload["epoch"], "checkpoint": str(path),
                 "code_version": payload.get("code_version", "")})
    return model, config_from_dict(payload["config"]), meta


def _code_version() -> str:
    from hpcvid.version import code_version

    return code_version()


# ============================================================================== data
@dataclass
class DataBundle:
    """What a model trains on: train and validation datasets plus what the checkpoint must remember."""

    train: Any                       # torch Dataset with set_epoch(epoch)
    val: Any | None                  # held out from the TRAIN split; never the test split
    classes: list[str]
    model_args: dict[str, Any] = field(default_factory=dict)   # extra constructor args (input_dim, stack)
    meta: dict[str, Any] = field(default_factory=dict)         # input preparation, stored in checkpoints


def load_data(config: Config) -> DataBundle:
    """The bundle for ``config.train.model`` from the work folder (shards written by extract/features)."""
    if config.train.model == "lstm":
        return _feature_data(config)
    return _video_data(config)


def _shard_files(folder: Path) -> list[Path]:
    """The shard files of the newest complete set of shard records in ``folder`` (as merge chooses them)."""
    from hpcvid.fileio import read_json
    from hpcvid.stages.merge import find_shard_records

    return [folder / read_json(record)["file"] for record in find_shard_records(folder)]


def _video_data(config: Config) -> DataBundle:
    from hpcvid.learn.datasets import Augment, FlowDataset, FrameDataset, ShardVideoSource, TwoStreamDataset, VideoItem, hold_out
    from hpcvid.storage.manifest import load_manifest
    from hpcvid.storage.shards import ShardReader

    t = config.train
    shards = _shard_files(config.work_dir / "extract")
    classes = list(load_manifest(config.work_dir).classes)
    needs_flow = t.model in ("flow", "twostream")
    items, shard_of = [], {}
    for path in shards:
        with ShardReader(path) as reader:
            for vid in reader.video_ids():
                info = reader.info(vid)
                if info.get("split") != "train" or not info["has_frames"] or (needs_flow and not info["has_flow"]):
                    continue
                items.append(VideoItem(vid, int(info["label"]), int(info["frames"]), "train"))
                shard_of[vid] = str(path)
    if not items:
        raise StoreError(f"the shards in {config.work_dir / 'extract'} hold no train-split videos with "
                         f"{'flow' if needs_flow else 'frames'}: re-extract with extract.flow (and frames) enabled")
    train_items, val_items = hold_out(items, t.val_fraction, t.seed)
    source = ShardVideoSource(shard_of)
    augment = Augment(tuple(t.scale_jitter), t.flip) if t.augment else None
    meta = {"classes": classes, "flow_stack": t.flow_stack, "compensation": t.flow_camera_compensation,
            "val_ids": [it.id for it in val_items]}
    if t.model == "frame":
        make = lambda items, train: FrameDataset(source, items, train=train, seed=t.seed, augment=augment)  # noqa: E731
        return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, classes, {}, meta)
    cls = FlowDataset if t.model == "flow" else TwoStreamDataset
    make = lambda items, train: cls(source, items, stack=t.flow_stack, train=train, seed=t.seed,  # noqa: E731
                                    compensation=t.flow_camera_compensation, augment=augment)
    return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, classes,
                      {"stack": t.flow_stack}, meta)


def refeature_dir(work: Path | str) -> Path:
    """Where ``run features`` writes the fine-tuned frame CNN's per-frame features (same shard layout)."""
    return Path(work) / "features" / "frame"


def feature_source(config: Config) -> tuple[Any, str, Path]:
    """The LSTM's features and their name, in this order of preference:

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


def _feature_data(config: Config) -> DataBundle:
    import numpy as np

    from hpcvid.learn.datasets import FeatureDataset, feature_input_dim, hold_out
    from hpcvid.storage.manifest import load_manifest

    t = config.train
    source, name, folder = feature_source(config)
    classes = list(load_manifest(config.work_dir).classes)
    items = [it for it in source.items if it.split == "train"]
    if not items:
        raise StoreError(f"no train-split videos with features {name!r} in {config.work}: extract with a backbone")
    train_items, val_items = hold_out(items, t.val_fraction, t.seed)
    if source.mean is None:
        source.fit_statistics(train_items)      # the training videos' mean/std, never validation or test
    dim = int(np.asarray(source.mean).shape[0])
    make = lambda items, train: FeatureDataset(source, items, seq_len=t.seq_len, train=train, seed=t.seed,  # noqa: E731
                                               centring=t.temporal_centering)
    meta = {"classes": classes, "feature_set": name, "feature_dim": dim, "feature_folder": str(folder),
            "centring": t.temporal_centering, "seq_len": t.seq_len,
            "feature_mean": np.asarray(source.mean, np.float64), "feature_std": np.asarray(source.std, np.float64),
            "val_ids": [it.id for it in val_items]}
    return DataBundle(make(train_items, True), make(val_items, False) if val_items else None, classes,
                      {"input_dim": feature_input_dim(dim, t.temporal_centering)}, meta)


def model_init_args(config: Config, bundle: DataBundle) -> dict[str, Any]:
    """Constructor arguments of the configured model (what the checkpoint stores to rebuild it)."""
    t, n = config.train, len(bundle.classes)
    if t.model == "frame":
        return {"num_classes": n, "backbone": t.backbone, "weights": t.weights, "freeze_trunk": t.freeze_trunk,
                "dropout": t.dropout}
    if t.model == "flow":
        return {"num_classes": n, "stack": bundle.model_args.get("stack", t.flow_stack),
                "backbone": _flow_backbone(t.backbone), "weights": t.weights, "dropout": t.dropout}
    if t.model == "twostream":
        return {"num_classes": n, "stack": bundle.model_args.get("stack", t.flow_stack),
                "backbone": _flow_backbone(t.backbone), "weights": t.weights, "dropout": t.dropout}
    return {"num_classes": n, "input_dim": bundle.model_args["input_dim"], "hidden": t.hidden, "layers": t.layers,
            "dropout": t.dropout, "input_norm": t.input_norm,
            "mean_scale": t.mean_scale if t.temporal_centering else 1.0}


def _flow_backbone(name: str) -> str:
    """GoogLeNet has no widened-first-conv variant here: a flow trunk is ResNet-18 or the small CNN."""
    return "small" if name == "small" else "resnet18"


# ============================================================================== the trainer
def train(config: Config, env: DistEnv | None = None, data_factory: Callable | None = None) -> dict[str, Any]:
    """Train ``config.train.model`` in this process as rank ``env.rank`` (see the module docstring)."""
    return Trainer(config, env or detect(), data_factory).fit()


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    correct: float = 0.0
    count: float = 0.0
    wait: float = 0.0
    elapsed: float = 0.0


class Trainer:
    def __init__(self, config: Config, env: DistEnv, data_factory: Callable | None = None) -> None:
        self.config = config
        self.env = env
        self.data_factory = data_factory or load_data
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

    # -------------------------------------------------------------- setup
    def _setup_distributed(self) -> None:
        import torch
        import torch.distributed as dist

        t = self.config.train
        from hpcvid.learn.backbones import pick_device

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

    def _build(self) -> None:
        import torch

        from hpcvid.learn.models import MODELS
        from hpcvid.learn.tbptt import loss_weights

        t = self.config.train
        self.bundle = self.data_factory(self.config)
        self.init_args = model_init_args(self.config, self.bundle)
        torch.manual_seed(t.seed)                      # the same initial weights on every rank
        self.model = MODELS[t.model](**self.init_args)
        if t.model == "twostream" and t.init_from_runs:
            self._init_twostream()
        self.model.to(self.device)
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
        self.seq_weights = loss_weights(t.seq_len, t.loss_weighting).to(self.device) if t.model == "lstm" else None

    def _init_twostream(self) -> None:
        """Start the two streams from trained frame and flow runs of this work folder, when they exist."""
        states = {}
        for kind in ("frame", "flow"):
            folder = self.config.work_dir / "runs" / kind
            found = (folder / BEST_NAME) if (folder / BEST_NAME).is_file() else None
            if found is None:
                newest = newest_valid_checkpoint(folder) if folder.is_dir() else None
                found = newest[0] if newest else None
            if found is None:
                log.warning("twostream: no trained %s run in %s; that stream starts from scratch", kind, folder)
                continue
            payload = load_checkpoint(found)
            expected = self.model.rgb.init_args if kind == "frame" else self.model.flow.init_args
            check_compatible(payload, found, kind, {k: v for k, v in expected.items()
                                                    if k not in ("dropout", "freeze_trunk")})
            states[kind] = payload["model"]
            log.info("twostream: %s stream from %s", kind, found)
        self.model.init_from(states.get("frame"), states.get("flow"))

    def _steps_per_epoch(self) -> int:
        """Optimiser steps per epoch (TBPTT: one per chunk); what the cyclic schedule counts in."""
        samples = math.ceil(len(self.bundle.train) / self.env.world_size)
        batches = math.ceil(samples / self.per_rank_batch)
        return batches * self._steps_per_batch()

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

    # -------------------------------------------------------------- checkpoints
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
            "kind": self.config.train.model, "init_args": self.init_args,
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
        atomic_write_text(self.run / METRICS_NAME, "".join(json.dumps(h, sort_keys=True) + "\n" for h in self.history))
        self.saved_position = (self.epoch, self.step_in_epoch)

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
        check_compatible(payload, path, self.config.train.model, self.init_args)
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
            log.info("resuming %s from %s (epoch %d, step %d)", self.config.train.model, path, self.epoch,
                     self.step_in_epoch)
        return (self.step_in_epoch // self._steps_per_batch()) * self.per_rank_batch

    def _steps_per_batch(self) -> int:
        """Optimiser steps one batch makes: one, or one per truncated-BPTT chunk."""
        t = self.config.train
        return math.ceil(t.seq_len / t.chunk) if t.model == "lstm" else 1

    # -------------------------------------------------------------- the loop
    def fit(self) -> dict[str, Any]:
        import torch
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        self._setup_distributed()
        self.code_version = _code_version()
        if self.env.is_main:
            self.run.mkdir(parents=True, exist_ok=True)
            remove_stale_partials(self.run)
            write_resolved(self.config, self.run, argv=sys.argv)
        self._build()
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

    def _loader(self, dataset: Any, sampler: Any) -> Any:
        from torch.utils.data import DataLoader

        import torch

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
        import torch
        from torch.utils.data.distributed import DistributedSampler

        from hpcvid.learn.datasets import one_line_errors

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
        for batch in one_line_errors(loader):
            stats.wait += time.perf_counter() - waited_since
            *inputs, labels = [b.to(self.device, non_blocking=True) for b in batch]
            self.at_safe_point = False
            loss, correct = self._step(inputs, labels)
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

    def _step(self, inputs: list[Any], labels: Any) -> tuple[float, float]:
        """One batch: plain step for the CNNs, one step per chunk (truncated BPTT) for the LSTM."""
        import torch
        from torch.nn import functional as F

        from hpcvid.learn.tbptt import train_sequence

        self.optimizer.zero_grad(set_to_none=True)
        if self.config.train.model == "lstm":
            result = train_sequence(self.model, inputs[0], labels, chunk=self.config.train.chunk,
                                    weights=self.seq_weights, after_backward=self._optimiser_step,
                                    backward=lambda loss: self.scaler.scale(loss).backward(),
                                    autocast=self._autocast)
            correct = float((result.logits[:, -1].argmax(-1) == labels).sum())
            return result.loss, correct
        with self._autocast():
            logits = self.model(*inputs)
            loss = F.cross_entropy(logits.float(), labels)
        self.scaler.scale(loss).backward()
        self._optimiser_step()
        return float(loss.detach()), float((logits.detach().argmax(-1) == labels).sum())

    def validate(self) -> tuple[float, float]:
        """Loss and accuracy on the held-out part of the train split, every video counted exactly once."""
        import torch
        from torch.nn import functional as F

        from hpcvid.learn.datasets import one_line_errors
        from hpcvid.learn.tbptt import weighted_sequence_loss

        dataset = self.bundle.val
        if dataset is None or len(dataset) == 0:
            return float("nan"), float("nan")
        dataset.set_epoch(self.epoch)
        mine = list(range(self.env.rank, len(dataset), self.env.world_size))     # disjoint, no padding
        loader = self._loader(dataset, mine)
        self.model.eval()
        stats = EpochStats()
        with torch.no_grad():
            for batch in one_line_errors(loader):
                *inputs, labels = [b.to(self.device) for b in batch]
                with self._autocast():
                    logits = self.model(*inputs)
                if self.config.train.model == "lstm":
                    loss = weighted_sequence_loss(logits.float(), labels, self.seq_weights)
                    logits = logits[:, -1]
                else:
                    loss = F.cross_entropy(logits.float(), labels)
                stats.loss_sum += float(loss) * len(labels)
                stats.correct += float((logits.argmax(-1) == labels).sum())
                stats.count += len(labels)
        total = _all_reduce_stats(stats, self.env, self.device)
        if total.count != len(dataset):
            raise RuntimeError(f"validation counted {total.count} videos, expected {len(dataset)}")
        return total.loss_sum / total.count, total.correct / total.count


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
