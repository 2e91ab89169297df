"""How the trainer's batches are made: which samples go together, which process reads them, where they are
prepared, and what happens when a loading process dies.

One DataLoader serves a run's training and validation passes. Its workers (``train.workers``; by default
from the cores of the task: all but one on a GPU, a quarter on the CPU, where the training process keeps
the others as torch threads) are started once and kept for the whole run; each opens its own HDF5 handles.
Its sampler, the :class:`Plan`, is the stream of every batch of the run as :class:`Request` s (pass, epoch,
sample positions), so the workers run ahead across the ends of passes. A worker answers a request with
one batch (:func:`make_batch`): the dataset reads the batch's samples together and prepares them there
(CPU training), or hands back the stored tensors (uint8 frames or JPEG bytes, stored flow) for the
training process to prepare on its GPU. Datasets without the batched interface (a ``__getitem__`` of their
own) are read item by item and collated, as torch does.

The epoch's order is that of torch's ``DistributedSampler`` (seed + epoch, disjoint per rank) or, with
``train.shuffle = "blocks"``, one that keeps neighbouring videos of the files together
(:func:`block_order`). Either way every sample is seen once per epoch, the same samples on any number of
workers, and the samples' own randomness comes from ``(seed, epoch, index)``, so the batches are the same
tensors with 0, 1 or N workers, with or without the cache.
"""
from __future__ import annotations

import mmap
import os
import re
import sys
from typing import Any, Callable, Iterator, NamedTuple, Sequence

from hpcvid.errors import ResourceError


class Request(NamedTuple):
    """One batch to make: of which pass (``"train"`` or ``"val"``), in which epoch, which sample positions, and
    its place in the run's stream of batches (numbered by :class:`Plan`)."""

    part: str
    epoch: int
    indices: tuple[int, ...]
    number: int = 0


class Plan:
    """The DataLoader's sampler: every batch request of the run, pass after pass (an epoch's training, then its
    validation), made lazily by ``requests()``. One stream for the whole run lets the workers prepare the next
    pass's first batches while the current pass ends (its last steps, the checkpoint), instead of every pass
    starting with idle workers and a waiting training process."""

    def __init__(self, requests: Callable[[], Iterator[Request]]) -> None:
        self.requests = requests

    def __iter__(self) -> Iterator[Request]:
        return (request._replace(number=number) for number, request in enumerate(self.requests()))


def reads_in_batches(dataset: Any) -> bool:
    """Whether ``dataset`` reads a batch at once (``load_batch``/``prepare_batch``) rather than item by item.

    A subclass that overrides ``__getitem__`` below the class that gives it ``load_batch`` is read item by
    item: its ``__getitem__`` is what its author meant a sample to be.
    """
    def owner(name: str) -> type | None:
        return next((klass for klass in type(dataset).__mro__ if name in vars(klass)), None)

    batch_owner, item_owner = owner("load_batch"), owner("__getitem__")
    return (batch_owner is not None and item_owner is not None and issubclass(batch_owner, item_owner)
            and callable(getattr(dataset, "prepare_batch", None)))


def make_batch(dataset: Any, indices: Sequence[int], epoch: int, prepare: bool, device: Any = None) -> Any:
    """One batch of ``indices`` in ``epoch``: prepared tensors (inputs..., labels), or, without ``prepare``,
    the stored tensors (a dict) for :meth:`prepare_batch` on another device."""
    if reads_in_batches(dataset):
        raw = dataset.load_batch(list(indices), epoch)
        return dataset.prepare_batch(raw, device) if prepare else raw
    from torch.utils.data import default_collate

    dataset.set_epoch(epoch)
    return default_collate([dataset[i] for i in indices])


class Batches:
    """The dataset the DataLoader sees: item ``Request(part, epoch, indices)`` is that batch of ``parts[part]``,
    prepared here when ``prepare`` (on the CPU), stored tensors otherwise; handed back through ``slots`` when
    given (:class:`Slots`)."""

    def __init__(self, parts: dict[str, Any], prepare: bool, slots: Slots | None = None) -> None:
        self.parts, self.prepare, self.slots = parts, prepare, slots

    def __getitem__(self, request: Request) -> Any:
        batch = make_batch(self.parts[request.part], request.indices, request.epoch, self.prepare)
        return batch if self.slots is None else self.slots.put(request.number, batch)

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())


# ------------------------------------------------------------------------------ handing batches back
class Slots:
    """Shared memory through which the workers hand finished batches to the training process.

    torch sends each tensor of a batch from a worker as a shared-memory file that the receiving process
    fetches over a socket: ~1.5-2 ms per batch on the 2-core machine, whatever its size, which is 5-15 % of a
    small model's step there. Here a worker copies the batch's tensors into the slot of its request's number
    and sends back only where they lie (:class:`InSlot`). The training process either copies them out
    (:meth:`take`: a batch it may keep) or uses them where they lie (:meth:`lend`: no copy at all, for a
    batch used in one step and dropped).

    A slot is written again ``count`` requests later. The DataLoader dispatches a request only when the
    batches before it, but ``workers x prefetch``, have been handed out. With ``count = workers x prefetch +
    2``, the slot of batch ``n`` is next written for the request dispatched when batch ``n + 2`` is handed
    out: a copied batch is always out before that, and a lent batch is valid while its consumer holds batch
    ``n`` and then ``n + 1``. The memory is an anonymous shared mapping made before the workers fork; a batch
    larger than a slot, or a worker started by spawn, sends the batch the usual way.
    """

    ALIGN = 64

    def __init__(self, count: int, size: int) -> None:
        self.count, self.size = count, -(-size // self.ALIGN) * self.ALIGN
        self._memory: mmap.mmap | None = mmap.mmap(-1, self.count * self.size)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_memory": None}

    @classmethod
    def for_loader(cls, workers: int, prefetch: int, size: int) -> Slots:
        """Slots of ``size`` bytes for a DataLoader with ``workers`` and ``prefetch``: as few as keep a lent
        batch valid until the second batch after it is handed out."""
        return cls(workers * prefetch + 2, size)

    @classmethod
    def room_for(cls, batch: Any) -> int:
        """The bytes a slot needs to hold ``batch``."""
        tensors: list[Any] = []
        _flatten(batch, tensors)
        return sum(-(-t.numel() * t.element_size() // cls.ALIGN) * cls.ALIGN for t in tensors)

    def put(self, number: int, batch: Any) -> Any:
        """In a worker: ``batch`` written into slot ``number % count`` -> its :class:`InSlot`."""
        tensors: list[Any] = []
        shape = _flatten(batch, tensors)
        places, end = [], 0
        for tensor in tensors:
            places.append((end, tuple(tensor.shape), tensor.dtype))
            end += -(-tensor.numel() * tensor.element_size() // self.ALIGN) * self.ALIGN
        if self._memory is None or end > self.size:
            return batch
        slot = number % self.count
        for tensor, (offset, _, _) in zip(tensors, places):
            if tensor.numel():
                self._view(slot, offset, tensor.shape, tensor.dtype).copy_(tensor)
        return InSlot(slot, shape, places)

    def take(self, item: Any, pin: bool = False) -> Any:
        """In the training process: the batch of an :class:`InSlot`, copied out (into pinned memory for a
        GPU); anything else as it is."""
        import torch

        if not isinstance(item, InSlot):
            return item
        tensors = []
        for offset, shape, dtype in item.places:
            out = torch.empty(shape, dtype=dtype, pin_memory=pin)
            if out.numel():
                out.copy_(self._view(item.slot, offset, shape, dtype))
            tensors.append(out)
        return _unflatten(item.shape, tensors)

    def lend(self, item: Any) -> Any:
        """In the training process: the batch of an :class:`InSlot` as views of its slot, not copied; anything
        else as it is. Valid only until the loader hands out the second batch after it (see the class): for
        a step that drops its inputs before asking for the next batch but one.

        Copying a batch out costs more than its bytes suggest: the worker wrote them on another core, and each
        batch's fresh tensors are new memory. Measured on the 2-core machine with an 8 MB batch from a
        worker: copying it out and reading it once took 7.8-9.0 ms, reading it in its slot 4.0-4.3 ms."""
        if not isinstance(item, InSlot):
            return item
        return _unflatten(item.shape, [self._view(item.slot, offset, shape, dtype)
                                       for offset, shape, dtype in item.places])

    def _view(self, slot: int, offset: int, shape: Sequence[int], dtype: Any) -> Any:
        import math

        import torch

        count = math.prod(shape)
        if not count:       # frombuffer refuses an empty view
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self._memory, dtype=dtype, count=count, offset=slot * self.size + offset).view(shape)


class InSlot(NamedTuple):
    """Where a batch lies in :class:`Slots`: its slot, its structure, and each tensor's (offset, shape, dtype)."""

    slot: int
    shape: Any
    places: list[tuple[int, tuple[int, ...], Any]]


def _flatten(batch: Any, tensors: list[Any]) -> Any:
    """The structure of a batch (tuples, lists, dicts of tensors and plain values), its tensors appended."""
    import torch

    if isinstance(batch, torch.Tensor):
        tensors.append(batch)
        return ("tensor", len(tensors) - 1)
    if isinstance(batch, dict):
        return ("dict", {key: _flatten(value, tensors) for key, value in batch.items()})
    if isinstance(batch, (list, tuple)):
        return (type(batch).__name__, [_flatten(value, tensors) for value in batch])
    return ("value", batch)


def _unflatten(shape: Any, tensors: list[Any]) -> Any:
    kind, content = shape
    if kind == "tensor":
        return tensors[content]
    if kind == "dict":
        return {key: _unflatten(value, tensors) for key, value in content.items()}
    if kind in ("list", "tuple"):
        items = [_unflatten(value, tensors) for value in content]
        return items if kind == "list" else tuple(items)
    return content


# ------------------------------------------------------------------------------ the order of an epoch
def train_requests(size: int, *, batch: int, epoch: int, seed: int, world: int = 1, rank: int = 0, skip: int = 0,
                   storage_order: Sequence[int] | None = None, block: int = 0) -> list[Request]:
    """The training batches of one rank in one epoch, after its first ``skip`` samples (a resumed epoch).

    The order is torch's ``DistributedSampler``'s (seed + epoch; padded by repeating its start so every rank
    has as many samples), or, given ``storage_order`` and ``block``, :func:`block_order` split the same way.
    """
    from torch.utils.data.distributed import DistributedSampler

    if storage_order is not None and block > 0:
        order = block_order(storage_order, block, seed, epoch)
        padded = order + order[:(-len(order)) % world]
        mine = padded[rank::world]
    else:
        sampler = DistributedSampler(range(size), num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                     drop_last=False)
        sampler.set_epoch(epoch)
        mine = [int(i) for i in sampler]
    mine = mine[skip:]
    return [Request("train", epoch, tuple(mine[i:i + batch])) for i in range(0, len(mine), batch)]


def block_order(storage_order: Sequence[int], block: int, seed: int, epoch: int) -> list[int]:
    """A shuffle that keeps reads local: the samples in storage order are cut into blocks of ``block``, the
    blocks are shuffled and so is each block's content. Every sample still comes once per epoch; a batch
    mixes at most a few blocks, so it reads from a few regions of the files (at the price of batches that
    mix fewer videos: when storage order follows the classes, batches hold fewer classes)."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    blocks = [list(storage_order[i:i + block]) for i in range(0, len(storage_order), block)]
    order: list[int] = []
    for b in torch.randperm(len(blocks), generator=generator).tolist():
        order += [blocks[b][j] for j in torch.randperm(len(blocks[b]), generator=generator).tolist()]
    return order


def val_requests(size: int, *, batch: int, epoch: int, world: int = 1, rank: int = 0) -> list[Request]:
    """Validation batches of one rank: positions rank, rank + world, ... (disjoint, no padding: every video
    is counted exactly once over the ranks)."""
    mine = list(range(rank, size, world))
    return [Request("val", epoch, tuple(mine[i:i + batch])) for i in range(0, len(mine), batch)]


# ------------------------------------------------------------------------------ the DataLoader
def task_cores(config: Any, world_size: int) -> int:
    """The cores this training process may use: ``launch.cpus_per_task`` in a SLURM job, else the affinity
    mask shared by the processes of this machine (``LOCAL_WORLD_SIZE`` of torchrun, else every rank)."""
    from hpcvid.launch.executors import usable_cores

    if config.launch.executor == "slurm" and "SLURM_JOB_ID" in os.environ:
        return max(1, int(config.launch.cpus_per_task))
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or world_size)
    return max(1, usable_cores() // max(1, local))


def worker_count(config: Any, world_size: int, on_gpu: bool) -> int:
    """``train.workers``, or with -1 (at least 1): on a GPU one per core of the task less one (the training
    process mostly waits for the GPU), on the CPU a quarter of them (the training step needs the rest:
    :func:`training_threads`)."""
    workers = int(config.train.workers)
    if workers >= 0:
        return workers
    cores = task_cores(config, world_size)
    return max(1, cores - 1 if on_gpu else cores // 4)


def training_threads(cores: int, workers: int) -> int:
    """CPU threads for the training process beside ``workers`` busy workers: the task's other cores. With more
    threads than cores, torch's threads wait for each other at every step (measured on the 2-core machine
    with one worker: 2 threads trained the flow model 3-4x slower than 1)."""
    return max(1, cores - workers)


def make_loader(batches: Batches, plan: Plan, *, workers: int, prefetch: int, pin_memory: bool, seed: int) -> Any:
    """A DataLoader over ``batches`` in the order of ``plan``, its workers kept between passes.

    It has its own random generator: creating an iterator must not draw from the global stream (dropout),
    or a resume in the middle of an epoch would shift every random number after it.
    """
    import torch
    from torch.utils.data import DataLoader

    extra: dict[str, Any] = {}
    if workers:
        extra = {"persistent_workers": True, "prefetch_factor": prefetch,
                 "multiprocessing_context": "spawn" if sys.platform == "darwin" else None}
    return DataLoader(batches, batch_size=None, sampler=plan, num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), **extra)


def close_loader(loader: Any) -> None:
    """Stop the workers of a DataLoader now (kept workers otherwise live until it is garbage-collected).

    A worker already gone is not an error here: SLURM signals every process of a job step at its walltime
    or on a cancel, so the workers may have died of the same signal that is ending training, and torch's
    complaint about them would replace the exit that requeues the job.
    """
    iterator = getattr(loader, "_iterator", None)
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        try:
            shutdown()
        except RuntimeError as error:       # "DataLoader worker (pid N) is killed by signal: ..."
            if "DataLoader worker" not in str(error):
                raise
    if loader is not None:
        loader._iterator = None


def worker_pids(loader: Any) -> list[int]:
    """The process ids of a DataLoader's running workers, in worker order (empty without workers)."""
    return [int(w.pid) for w in getattr(getattr(loader, "_iterator", None), "_workers", []) or [] if w.pid]


_DIED = re.compile(r"DataLoader worker \(pids?(?:\(s\))? ([\d, ]+)\)\s*(.*)")


def worker_died(error: BaseException, pids: Sequence[int], where: str) -> ResourceError | None:
    """The one-line error for torch's report that a DataLoader worker died (None for any other error).

    torch says it in the middle of whatever the training process was doing (its SIGCHLD handler), or when a
    batch does not come; either way training stops with this line instead of a traceback or a wait.
    """
    match = _DIED.search(str(error))
    if match is None:
        return None
    died = [int(p) for p in re.findall(r"\d+", match.group(1))]
    names = ", ".join(f"worker {pids.index(p)} (pid {p})" if p in pids else f"pid {p}" for p in died)
    how = " ".join(match.group(2).split()).rstrip(". ") or "exited unexpectedly"
    return ResourceError(f"DataLoader {names} died {where} ({how}): killed from outside or out of memory; "
                         "lower train.workers or train.cache_gb, or look for an out-of-memory kill in the "
                         "job's log or `dmesg`, then rerun to resume")
