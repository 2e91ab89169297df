"""The merged features file (``WORK/features.h5``, written by :mod:`hpcvid.stages.merge`) and its reader.

One file sees every shard's features, for fast training reads: a training step reads random windows of
L frames from random videos, and with all videos' features in one ``(N_frames_total, D)`` dataset plus
per-video offsets a window is one slice of consecutive rows. Videos are sorted by id, so the file does
not depend on how many shards extraction used.

Layout (root attributes ``schema_version`` = 2, ``kind = "hpcvid.merged"``, and as JSON ``classes``,
``backbones``, ``scores`` and ``sources``: the shard records it was built from)::

    features/<backbone>        (N_frames_total, D) float32, chunks of 16 rows
    scores/<name>              (N_frames_total, C) float32, chunks of 16 rows, when every video has them
    videos/id, class_name, split, feature_shard   (N,) fixed-length UTF-8
    videos/offset, length, label                  (N,) int64
    stats/<backbone>/mean, std (D,) float32: train split only (every video when there is none);
                               attributes n_frames, n_videos, rms, epsilon (:mod:`hpcvid.learn.statistics`)

Every dataset carries a fletcher32 checksum per chunk (:mod:`hpcvid.storage.h5`), so a damaged chunk fails
its read with a one-line StoreError instead of becoming features. A random L=120 window touches 8-9 chunks
of 16 rows (the measured best, see :data:`hpcvid.storage.h5.FEATURE_CHUNK_ROWS`); with every chunk
verified, windows read at about a fifth of the speed of schema 1's unchecked contiguous dataset
(~2,200-2,800 against ~11,000-12,400 windows/s of 1024 float32 on the 2-core machine), still 25-28x one
``.npy`` file per frame (``hpcvid bench --only storage``; the target is 20x). ``feature_shard`` is where each video's features
came from (relative to this file's folder), for provenance; frames and flow are read from the extract
shards, never through this file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from hpcvid.errors import StoreError
from hpcvid.storage.h5 import FEATURE_CHUNK_ROWS, H5File, H5Reader, RowLayout, read_text

MERGED_SCHEMA_VERSION = 2
MERGED_KIND = "hpcvid.merged"
FIX = "rebuild it with `hpcvid run merge --force`"


class Entry(NamedTuple):
    """One video of the merged file."""

    id: str
    label: int
    split: str
    offset: int
    length: int


class MergedFeatures(H5Reader):
    """Read the merged file: per-video entries, random windows of features, the train statistics.

    Lazy and picklable: the metadata is read when it is created and the file closed again; the data is
    opened on the first window read in the current process (so a DataLoader may fork or spawn workers
    after creating it) and the handle is dropped when pickled.
    """

    def __init__(self, path: Path | str, backbone: str | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise StoreError(f"{self.path} does not exist: run `hpcvid run merge --work WORK` first")
        self._h5 = H5File(self.path, kinds={MERGED_KIND: FIX}, schema_version=MERGED_SCHEMA_VERSION)
        try:
            self._read_metadata(self._h5.handle, backbone)
        finally:
            self._h5.close()

    def _read_metadata(self, handle: Any, backbone: str | None) -> None:
        with self._h5.reading():
            self.backbones: list[str] = json.loads(handle.attrs["backbones"])
            self.score_names: list[str] = json.loads(handle.attrs["scores"])
            self.classes: list[str] = json.loads(handle.attrs["classes"])
            backbone = self.backbones[0] if backbone is None else backbone
            if backbone not in self.backbones:
                raise StoreError(f"{self.path} has no features of {backbone!r}; it has {', '.join(self.backbones)}")
            self.backbone = backbone
            index = handle["videos"]
            ids, splits = read_text(index["id"]), read_text(index["split"])
            labels, offsets, lengths = index["label"][()], index["offset"][()], index["length"][()]
            self.entries: list[Entry] = [Entry(i, int(l), s, int(o), int(n))
                                         for i, l, s, o, n in zip(ids, labels, splits, offsets, lengths)]
            self.mean: np.ndarray = handle[f"stats/{backbone}/mean"][()]
            self.std: np.ndarray = handle[f"stats/{backbone}/std"][()]
            self.dim = int(handle[f"features/{backbone}"].shape[1])

    def __len__(self) -> int:
        return len(self.entries)

    def indices(self, split: str) -> list[int]:
        """Positions of the videos of one split ('train', 'test', 'unused')."""
        return [i for i, e in enumerate(self.entries) if e.split == split]

    def window(self, i: int, start: int, length: int) -> np.ndarray:
        """float32 (length, D): frames ``start .. start+length-1`` of video ``i``, reading only their chunks."""
        entry = self.entries[i]
        if start < 0 or length < 0 or start + length > entry.length:
            raise ValueError(f"window [{start}, {start + length}) is outside video {entry.id!r} "
                             f"of {entry.length} frames")
        features = self._h5.dataset(f"features/{self.backbone}")
        with self._h5.reading(entry.id):
            return features[entry.offset + start: entry.offset + start + length]

    def windows(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """float32 windows ``(video i, start, length)`` of a batch, in the asked order, read in file order:
        windows that share or touch a chunk are read as one contiguous slice (each chunk read and verified
        once). One selection of every window in a single HDF5 call was measured slower: HDF5's irregular
        hyperslab reads cost ~20x the plain slices on a 16-window batch."""
        spans = []
        for k, (i, start, length) in enumerate(requests):
            entry = self.entries[i]
            if start < 0 or length < 0 or start + length > entry.length:
                raise ValueError(f"window [{start}, {start + length}) is outside video {entry.id!r} "
                                 f"of {entry.length} frames")
            spans.append((entry.offset + start, entry.offset + start + length, k))
        features = self._h5.dataset(f"features/{self.backbone}")
        out: list[np.ndarray] = [np.zeros((0, self.dim), np.float32)] * len(spans)
        for first, last, members in _contiguous(sorted(spans), FEATURE_CHUNK_ROWS):
            video = self.entries[requests[members[0][2]][0]].id       # the first video of the slice, for errors
            with self._h5.reading(video):
                rows = features[first:last]
            for start, stop, k in members:
                out[k] = rows[start - first:stop - first]
        return out

    def layout(self, i: int) -> RowLayout:
        """One feature row per frame of video ``i`` (for an in-memory cache of the windows)."""
        return RowLayout(self.entries[i].length, (self.dim,), "<f4")

    def video(self, i: int) -> np.ndarray:
        """float32 (T, D): every frame's features of video ``i``."""
        return self.window(i, 0, self.entries[i].length)


def _contiguous(spans: Sequence[tuple[int, int, int]], gap: int) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """Sorted ``(start, stop, tag)`` row spans -> ``(first, last, members)`` slices covering them, joining
    spans less than ``gap`` rows apart (what a chunk of ``gap`` rows would make the reader fetch anyway)."""
    joined: list[tuple[int, int, list[tuple[int, int, int]]]] = []
    for span in spans:
        if joined and span[0] - joined[-1][1] < gap:
            first, last, members = joined[-1]
            joined[-1] = (first, max(last, span[1]), members + [span])
        else:
            joined.append((span[0], span[1], [span]))
    return joined
