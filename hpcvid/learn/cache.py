"""An in-memory cache of decoded inputs, shared by the training process and its DataLoader workers.

A set whose decoded inputs fit ``train.cache_gb`` (per training process) is read from its files once: in the
first epoch each frame, flow pair or feature row is stored in memory by whichever process reads it first,
and every later read of it is a copy from memory. What is cached is what the reads return before any
random choice or preparation (decoded JPEG frames, flow as stored, feature rows), so a cached epoch gives
the same tensors, bit for bit, as an uncached one.

The memory is one anonymous shared mapping made before the DataLoader forks its workers: pages are taken
only as rows are filled, every worker sees what the others stored, and it is freed when the last of them
exits (nothing is left in /dev/shm after a kill). A worker started by *spawn* (macOS) cannot map it and
reads the files instead. A row is marked filled under a lock after its bytes are written, and read only
after its mark is seen under the same lock, so a reader never sees a half-written row on any CPU.

Sizes come from one video per part (an extraction stores every video at one size) and each video's row
count; a video whose rows turn out to have another shape or type is simply never cached.
"""
from __future__ import annotations

import mmap
import multiprocessing
from typing import Any, Hashable, Mapping, Sequence

import numpy as np

from hpcvid.storage.h5 import RowLayout
from hpcvid.storage.shards import StoredFlow

ALIGN = 64
"""Byte alignment of each video's rows (a cache line)."""


class RowCache:
    """Rows of many videos (``key -> RowLayout``) in shared memory, each marked when filled.

    ``rows``/``put`` move numpy arrays in and out; per key a (scale, offset) pair is kept beside the rows
    (quantised flow needs it to become pixels).
    """

    def __init__(self, layouts: Mapping[Hashable, RowLayout]) -> None:
        self.layouts = dict(layouts)
        self._where: dict[Hashable, tuple[int, int, int]] = {}    # key -> (byte offset, first row, key number)
        data_bytes, rows = 0, 0
        for number, (key, layout) in enumerate(self.layouts.items()):
            self._where[key] = (data_bytes, rows, number)
            data_bytes += -(-layout.nbytes // ALIGN) * ALIGN
            rows += layout.rows
        self.nbytes = data_bytes
        self._sizes = (data_bytes, rows, len(self.layouts))
        self._memory: mmap.mmap | None = mmap.mmap(-1, max(1, data_bytes + rows + 8 * len(self.layouts)))
        self._lock = multiprocessing.get_context("fork").Lock()

    def __getstate__(self) -> dict[str, Any]:
        """A copy sent to a spawned process cannot map the memory: it caches nothing there."""
        state = dict(self.__dict__)
        state.update(_memory=None, _lock=None)
        return state

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        data_bytes, rows, keys = self._sizes
        assert self._memory is not None
        memory = np.frombuffer(self._memory, dtype=np.uint8)
        scaling = memory[data_bytes:data_bytes + 8 * keys].view(np.float32).reshape(keys, 2)
        filled = memory[data_bytes + 8 * keys:data_bytes + 8 * keys + rows]
        return memory[:data_bytes], filled, scaling

    def _rows_of(self, key: Hashable) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the key's rows, their filled marks, its scale and offset) as views of the shared memory."""
        data, filled, scaling = self._arrays()
        layout = self.layouts[key]
        offset, first, number = self._where[key]
        rows = data[offset:offset + layout.nbytes].view(np.dtype(layout.dtype)).reshape((layout.rows,) + layout.shape)
        return rows, filled[first:first + layout.rows], scaling[number]

    def rows(self, requests: Sequence[tuple[Hashable, np.ndarray]]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """For each ``(key, row positions)``: (a copy of those rows, the key's scale and offset) when every one
        is filled, else None (read it from the files and :meth:`put` it)."""
        if self._memory is None:
            return [None] * len(requests)
        views = []
        with self._lock:     # orders this check after the writers' marks, and so after their bytes
            for key, positions in requests:
                view = self._rows_of(key) if key in self._where else None
                ready = (view is not None and positions.size and int(positions.min()) >= 0
                         and int(positions.max()) < len(view[1]) and bool(view[1][positions].all()))
                views.append(view if ready else None)
        return [None if view is None else (view[0][positions], view[2].copy())
                for view, (_, positions) in zip(views, requests)]

    def put(self, key: Hashable, positions: np.ndarray, values: np.ndarray, scaling: Sequence[float] = (1.0, 0.0)) -> None:
        """Store ``values`` as rows ``positions`` of ``key`` (nothing when they do not fit its layout)."""
        if self._memory is None or key not in self._where or not positions.size:
            return
        layout = self.layouts[key]
        if (values.shape[1:] != tuple(layout.shape) or values.dtype != np.dtype(layout.dtype)
                or int(positions.min()) < 0 or int(positions.max()) >= layout.rows):
            return
        rows, filled, stored_scaling = self._rows_of(key)
        rows[positions] = values
        with self._lock:
            stored_scaling[:] = scaling
            filled[positions] = 1


# ------------------------------------------------------------------------------ sources that read through it
class _ThroughCache:
    """A source read through a cache: what the subclass does not define is the wrapped source's."""

    def __init__(self, source: Any, cache: RowCache) -> None:
        self.source, self.cache = source, cache

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "cache"):  # not set yet (unpickling): never recurse
            raise AttributeError(name)
        return getattr(self.source, name)


class CachedVideoSource(_ThroughCache):
    """A :class:`hpcvid.learn.datasets.VideoSource` whose frames and flow pairs come from a :class:`RowCache`
    once read (keys ``("frames", id)`` and ``("flow", id)``); everything else is the wrapped source's."""

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray:
        return self.frames_batch([(video_id, indices)])[0]

    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray:
        return self.flow_batch([(video_id, start, stop)])[0].pixels()

    def jpeg_batch(self, requests: Sequence[tuple[str, Sequence[int]]]) -> None:
        """Cached frames are decoded already: nothing is left to decode elsewhere."""
        return None

    def frames_batch(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray]:
        from hpcvid.learn.datasets import read_frames

        wanted = [(("frames", vid), np.asarray(list(indices), dtype=np.int64)) for vid, indices in requests]
        found = self.cache.rows(wanted)
        missing = [k for k, hit in enumerate(found) if hit is None]
        out: list[Any] = [None if hit is None else hit[0] for hit in found]
        for k, frames in zip(missing, read_frames(self.source, [requests[k] for k in missing])):
            self.cache.put(wanted[k][0], wanted[k][1], frames)
            out[k] = frames
        return out

    def flow_batch(self, requests: Sequence[tuple[str, int, int]]) -> list[StoredFlow]:
        from hpcvid.learn.datasets import read_flow

        wanted = [(("flow", vid), np.arange(start, stop)) for vid, start, stop in requests]
        found = self.cache.rows(wanted)
        missing = [k for k, hit in enumerate(found) if hit is None]
        out: list[Any] = [None if hit is None else StoredFlow(hit[0], np.float32(hit[1][0]), np.float32(hit[1][1]))
                          for hit in found]
        for k, stored in zip(missing, read_flow(self.source, [requests[k] for k in missing])):
            self.cache.put(wanted[k][0], wanted[k][1], stored.values, (stored.scale, stored.offset))
            out[k] = stored
        return out


class CachedFeatureSource(_ThroughCache):
    """A :class:`hpcvid.learn.datasets.FeatureSource` whose feature rows come from a :class:`RowCache` once
    read (keys ``("features", index)``); mean, std and everything else are the wrapped source's."""

    @property
    def mean(self) -> Any:
        return self.source.mean

    @property
    def std(self) -> Any:
        return self.source.std

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        return self.windows([(index, start, length)])[0]

    def windows(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        from hpcvid.learn.datasets import read_windows

        wanted = [(("features", index), np.arange(start, start + length)) for index, start, length in requests]
        found = self.cache.rows(wanted)
        missing = [k for k, hit in enumerate(found) if hit is None]
        out: list[Any] = [None if hit is None else hit[0] for hit in found]
        for k, window in zip(missing, read_windows(self.source, [requests[k] for k in missing])):
            self.cache.put(wanted[k][0], wanted[k][1], np.asarray(window))
            out[k] = window
        return out


def cache_inputs(datasets: Sequence[Any], budget_gb: float) -> dict[str, Any]:
    """Give ``datasets`` one :class:`RowCache` when all their decoded inputs fit ``budget_gb``.

    Returns what was decided: ``cached``, ``gb`` (what the set needs) and ``why`` (a line for the log).
    The sources' files, opened here to size the set, are closed again (DataLoader workers fork later).
    """
    if budget_gb <= 0:
        return {"cached": False, "gb": None, "why": "input cache off (train.cache_gb = 0)"}
    layouts: dict[Hashable, RowLayout] = {}
    try:
        for dataset in datasets:
            layout = dataset.cache_layout() if hasattr(dataset, "cache_layout") else None
            if layout is None:
                return {"cached": False, "gb": None,
                        "why": f"input cache off: {type(dataset).__name__}'s source cannot say what it would hold"}
            layouts.update(layout)
    finally:
        for dataset in datasets:
            close = getattr(getattr(dataset, "source", None), "close", None)
            if close is not None:
                close()
    need = sum(layout.nbytes for layout in layouts.values()) / 2**30
    if need > budget_gb:
        return {"cached": False, "gb": round(need, 3),
                "why": f"input cache off: the set needs {need:.1f} GB of memory, over train.cache_gb = {budget_gb:g}"}
    cache = RowCache(layouts)
    for dataset in datasets:
        dataset.use_cache(cache)
    return {"cached": True, "gb": round(need, 3),
            "why": f"decoded inputs cached in memory after their first read ({need * 1024:.0f} MB)"}
