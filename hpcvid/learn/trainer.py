"""The trainer: one loop for every model kind, on one process or many, surviving walltimes.

:meth:`Trainer.fit` reads top to bottom: data -> model -> optimiser/schedule -> resume -> DDP -> epoch loop
(:meth:`Trainer.train_epoch`, :meth:`Trainer.validate`) -> checkpoint + metrics. What differs between
models (datasets, constructor arguments, the training step, the validation loss, optimiser steps per
batch, a warm start) comes from the kind's module (:mod:`hpcvid.learn.kinds`); the data comes from the
``data_factory`` the caller gives (the train stage's :func:`hpcvid.stages.train.load_data`, or arrays in
tests), so this module chooses no input files.

Inputs come through one DataLoader whose workers are kept for the whole run (:mod:`hpcvid.learn.loader`):
batches are read and prepared together in the workers, or prepared on the GPU when training on CUDA, and
decoded inputs stay in memory when the set fits ``train.cache_gb`` (:mod:`hpcvid.learn.cache`).

Rank 0 writes a checkpoint (:mod:`hpcvid.learn.checkpoints`) after every epoch and, on a deferred stop
request (SLURM's pre-timeout signal), at the end of the current optimiser step. A rerun resumes from the
newest valid checkpoint. Randomness is reseeded from ``(seed, epoch, rank)`` at each epoch and data
randomness comes from ``(seed, epoch, index)``, so a run killed mid-epoch and resumed ends with the same
weights as an uninterrupted one, and N processes with the same global batch match one.

torch is imported inside functions: the train stage imports this module on a login node.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from hpcvid.config import Config, write_resolved
from hpcvid.launch.sharding import ShardSpec
from hpcvid.tensorboard_log import EpochBoard
from hpcvid.workfolder import Unit
from hpcvid.errors import CheckpointError, ConfigError
from hpcvid.fileio import remove_stale_partials
from hpcvid.launch.distributed import DistEnv, detect
from hpcvid.learn.checkpoints import (BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_VERSION, check_compatible,
                                      checkpoint_name, list_checkpoints, newest_valid_checkpoint, pick_checkpoint,
                                      run_dir, save_checkpoint, write_metrics)
from hpcvid.learn.datasets import one_line_errors
from hpcvid.learn.kinds import DataBundle, StepTools, get_kind
from hpcvid.learn.loader import close_loader, worker_died

log = logging.getLogger(__name__)

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
        self.loader: Any = None
        self.stream: Iterator[Any] | None = None     # the loader's batches, one iterator for the whole run
        self.slots: Any = None
        self.worker_pids: list[int] = []
        self.phase = "start"
        self.after_epoch: list[Callable[[Trainer], None]] = []   # called after each epoch's checkpoint (the bench)

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
        self._start_inputs(skip)
        self.progress_origin = (time.time(), self.epoch)     # this start's pace, for the ETA in `hpcvid status`
        self.board = EpochBoard.open(self.config.train.tensorboard and self.env.is_main, self.run, self.epoch)
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
                for hook in self.after_epoch:
                    hook(self)
                self._maybe_stop()
            finished = True
        except RuntimeError as error:    # torch's report of a dead worker, raised wherever this process was
            died = worker_died(error, self.worker_pids, f"while loading {self.phase} batches of epoch {self.epoch + 1}")
            if died is None:
                raise
            raise died from None
        finally:
            close_loader(self.loader)
            self.board.close()
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
        from hpcvid.version import code_version

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

    # -------------------------------------------------------------- inputs
    def _start_inputs(self, skip: int) -> None:
        """The loader of the rest of the run (its workers started at the first batch and kept), and the input
        cache. ``skip``: the samples of the current epoch already done (a resumed run).

        Inputs are prepared in the DataLoader workers, or, on CUDA with ``train.gpu_prepare``, handed over as
        stored (uint8 frames or JPEG bytes, stored flow) and prepared on the GPU by this process. The decoded
        inputs stay in memory when the whole set fits ``train.cache_gb``; no HDF5 file is left open here when
        the workers fork.
        """
        import torch

        from hpcvid.learn.cache import cache_inputs
        from hpcvid.learn.loader import Batches, Plan, make_loader, task_cores, training_threads, worker_count
        from hpcvid.learn.preparation import can_decode_jpeg

        t = self.config.train
        parts = {"train": self.bundle.train}
        if self.bundle.val is not None and len(self.bundle.val):
            parts["val"] = self.bundle.val
        on_device = self.device.type == "cuda" and t.gpu_prepare
        cached = cache_inputs(list(parts.values()), t.cache_gb)
        if on_device and not cached["cached"] and can_decode_jpeg():
            for dataset in parts.values():
                if hasattr(dataset, "decode_later"):
                    dataset.decode_later = True      # JPEG bytes to the GPU's decoder
        workers = worker_count(self.config, self.env.world_size, self.device.type == "cuda")
        if self.device.type == "cpu" and workers:       # the workers' cores are theirs (never more threads)
            cores = task_cores(self.config, self.env.world_size)
            torch.set_num_threads(min(torch.get_num_threads(), training_threads(cores, workers)))
        self.parts = parts
        self.slots = self._slots(workers, t.prefetch, prepare=not on_device) if workers else None
        plan = Plan(functools.partial(self._requests, self.epoch, skip))
        self.loader = make_loader(Batches(parts, prepare=not on_device, slots=self.slots), plan, workers=workers,
                                  prefetch=t.prefetch, pin_memory=self.device.type == "cuda", seed=t.seed)
        where = "on the GPU" if on_device else ("in the DataLoader workers" if workers else "in this process")
        self.inputs = {"workers": workers, "threads": torch.get_num_threads(), "prepared": where, **cached}
        if self.env.is_main:
            log.info("inputs: %d DataLoader worker(s) per process (%d torch threads here), prepared %s; %s",
                     workers, torch.get_num_threads(), where, cached["why"])

    def _slots(self, workers: int, prefetch: int, prepare: bool) -> Any:
        """Shared memory for the batches in flight (:class:`hpcvid.learn.loader.Slots`), a slot sized from a
        first batch of each pass made here (with room for larger JPEG bytes); the files it opened are closed
        before the workers fork."""
        from hpcvid.learn.loader import Slots, make_batch

        biggest = 0
        for dataset in self.parts.values():
            batch = make_batch(dataset, list(range(min(self.per_rank_batch, len(dataset)))), self.epoch, prepare)
            biggest = max(biggest, Slots.room_for(batch))
            close = getattr(getattr(dataset, "source", None), "close", None)
            if close is not None:
                close()
        return Slots.for_loader(workers, prefetch, 2 * biggest + 4096)

    def _requests(self, first: int, skip: int) -> Iterator[Any]:
        """Every batch of the run from epoch ``first`` on, in the order the epoch loop consumes them."""
        for epoch in range(first, self.config.train.epochs):
            yield from self._train_requests(epoch, skip if epoch == first else 0)
            yield from self._val_requests(epoch)

    def _train_requests(self, epoch: int, skip: int) -> list[Any]:
        from hpcvid.learn.loader import train_requests

        t, dataset = self.config.train, self.parts["train"]
        blocks = t.shuffle == "blocks" and hasattr(dataset, "storage_order")
        return train_requests(len(dataset), batch=self.per_rank_batch, epoch=epoch, seed=t.seed,
                              world=self.env.world_size, rank=self.env.rank, skip=skip,
                              storage_order=dataset.storage_order() if blocks else None, block=t.shuffle_block)

    def _val_requests(self, epoch: int) -> list[Any]:
        """This rank's validation videos: disjoint, no padding (every video counted once over the ranks)."""
        from hpcvid.learn.loader import val_requests

        if "val" not in self.parts:
            return []
        return val_requests(len(self.parts["val"]), batch=self.per_rank_batch, epoch=epoch,
                            world=self.env.world_size, rank=self.env.rank)

    def _batches(self, requests: list[Any], phase: str) -> Iterator[list[Any]]:
        """The loader's next ``len(requests)`` batches (those ``requests``), as model inputs on this process's
        device."""
        from hpcvid.learn.loader import worker_pids

        self.phase = phase
        if self.stream is None:
            self.stream = one_line_errors(iter(self.loader))
            self.worker_pids = worker_pids(self.loader)
        for request in requests:
            batch = next(self.stream)
            if self.slots is not None:       # a step drops its batch before asking for the next one
                on_gpu = self.device.type == "cuda"
                batch = self.slots.take(batch, pin=True) if on_gpu else self.slots.lend(batch)
            if isinstance(batch, dict):       # stored tensors: prepared here, on the device
                batch = self.parts[request.part].prepare_batch(batch, self.device)
            yield [b.to(self.device, non_blocking=True) for b in batch]

    # -------------------------------------------------------------- one epoch
    def train_epoch(self, skip: int = 0) -> EpochStats:
        """One pass over this rank's share of the training set (the first ``skip`` samples already done)."""
        self.bundle.train.set_epoch(self.epoch)
        requests = self._train_requests(self.epoch, skip)
        self.model.train()
        stats = EpochStats()
        start = time.perf_counter()
        waited_since = time.perf_counter()
        for inputs_and_labels in self._batches(requests, "training"):
            stats.wait += time.perf_counter() - waited_since
            *inputs, labels = inputs_and_labels
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
        requests = self._val_requests(self.epoch)
        self.model.eval()
        stats = EpochStats()
        with torch.no_grad():
            for batch in self._batches(requests, "validation"):
                *inputs, labels = batch
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
        self.board.epoch(self.history[-1])
        self.save(best=improved)
        stopped = bool(t.early_stopping and self.bad_epochs >= t.early_stopping)
        if self.env.is_main:
            h = self.history[-1]
            log.info("epoch %d/%d: train loss %.4f acc %.3f | val loss %.4f acc %.3f | %.1f samples/s",
                     self.epoch, t.epochs, h["train_loss"], h["train_acc"], val_loss, val_acc, h["samples_per_s"])
            self._write_progress(stopped)
        return stopped

    def _write_progress(self, stopped: bool) -> None:
        """Epochs done of the total, for `hpcvid status` on the login node (an early stop ends the run)."""
        from hpcvid.launch.progress import write_progress

        accuracies = [h["val_acc"] for h in self.history if h["val_acc"] == h["val_acc"]]
        total = self.epoch if stopped else self.config.train.epochs
        write_progress(self.config.work, Unit("train", self.config.train.model), ShardSpec(0, 1), done=self.epoch,
                       total=total, best_val_acc=max(accuracies, default=None), stopped_early=stopped,
                       started=self.progress_origin[0], done_at_start=self.progress_origin[1])

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
