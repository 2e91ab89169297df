"""What the models eat: frames, flow stacks and feature windows, and the input preparation shared with eval.

Input preparation (evaluation must call the same functions, so it sees exactly what training saw):

* :func:`prepare_frames` - uint8 ``(n, H, W, 3)`` -> float ``(n, 3, H, W)``, ImageNet mean/std.
* :func:`prepare_flow`   - float ``(L, H, W, 2)`` -> ``(2L, H, W)``; camera motion removed first by
  subtracting each pair's median (or mean) displacement (on the synthetic set with camera jitter, raw flow
  got 19 % and compensated flow 97-99 %).
* :func:`prepare_features` - ``(T, D)`` -> ``(T, 2D)``: standardised with the train mean/std of
  :mod:`hpcvid.learn.statistics` (std floored scale-relatively: untrained GoogLeNet features are ~1e-12),
  then centred in time with the clip's mean appended (centring took the LSTM from 50-73 % to 93-99 %).

These are the batched operations of :mod:`hpcvid.learn.preparation` applied to a batch of one; the datasets
apply them to whole batches.

Sequences: videos shorter than the window are padded by playing them backwards and forwards
(:func:`ping_pong_indices`); longer ones give a random window in training and the centre window in
validation (:func:`sequence_indices`). Randomness comes from ``(seed, epoch, index)``, never from global
state, so an epoch replays identically after a resume and with any number of DataLoader workers.

Batches. The datasets here read a whole batch at once (:meth:`FrameDataset.load_batch`: the sources' batched
reads, in storage order, one HDF5 read per video or per run of neighbouring feature windows) and prepare it
with tensor operations (:meth:`FrameDataset.prepare_batch`), in a DataLoader worker or on the GPU
(:mod:`hpcvid.learn.loader`). ``dataset[i]`` remains the one-sample view of the same two steps. A source
needs only :class:`VideoSource`'s or :class:`FeatureSource`'s one-video methods; the batched ones
(``frames_batch``, ``flow_batch``, ``jpeg_batch``, ``windows``, and ``layout`` for the in-memory cache of
:mod:`hpcvid.learn.cache`) are used when it has them.

HDF5 files are opened lazily in the process that reads them (never before a DataLoader fork). A read
that fails (a damaged chunk) raises a one-line StoreError naming the file and the video; when that happens
inside a DataLoader worker, iterate the loader through :func:`one_line_errors` to get that line back
instead of torch's re-raised copy with the worker's traceback pasted into its message.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from hpcvid.errors import HpcvidError, StoreError
from hpcvid.learn.preparation import (compensate_camera_batch, crop_resize_batch, decode_jpeg_batch, dequantise_flow,
                                      normalise_frames, prepare_feature_batch, resize_to, stack_flow)
from hpcvid.learn.statistics import FeatureStatistics, feature_statistics, normalise_features  # noqa: F401 (public here)
from hpcvid.storage.shards import StoredFlow


# ------------------------------------------------------------------------------ index arithmetic
def ping_pong_indices(available: int, length: int) -> list[int]:
    """``length`` frame indices from a video of ``available`` frames, bouncing at both ends.

    ``ping_pong_indices(3, 7) == [0, 1, 2, 1, 0, 1, 2]``; a long enough video is read straight.
    """
    if available < 1:
        raise ValueError("a video needs at least one frame")
    if available == 1:
        return [0] * length
    period = 2 * (available - 1)
    return [t % period if t % period < available else period - t % period for t in range(length)]


def window_start(available: int, length: int, rng: np.random.Generator | None) -> int:
    """Start of a ``length`` window: uniform at random with ``rng`` (training), centred without."""
    slack = available - length
    if slack <= 0:
        return 0
    return int(rng.integers(0, slack + 1)) if rng is not None else slack // 2


def sequence_indices(available: int, length: int, rng: np.random.Generator | None = None) -> list[int]:
    """Frame indices of one training/validation sequence: ping-pong padded if short, a window if long."""
    if available <= length:
        return ping_pong_indices(available, length)
    start = window_start(available, length, rng)
    return list(range(start, start + length))


def window_starts(available: int, length: int, count: int) -> list[int]:
    """``count`` evenly spaced window starts covering a video (for multi-window evaluation)."""
    slack = max(0, available - length)
    if count <= 1 or slack == 0:
        return [slack // 2]
    return sorted({round(i * slack / (count - 1)) for i in range(count)})


def item_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The random stream of one sample in one epoch: independent of workers, ranks and resumes."""
    return np.random.default_rng([seed, epoch, index])


# ------------------------------------------------------------------------------ input preparation
def centre_in_time(x: np.ndarray) -> np.ndarray:
    """``(T, D)`` -> ``(T, 2D)``: each step minus the clip's mean, with the clip's mean appended."""
    clip_mean = x.mean(axis=0, keepdims=True)
    return np.concatenate([x - clip_mean, np.broadcast_to(clip_mean, x.shape)], axis=1).astype(np.float32)


def prepare_features(window: np.ndarray, mean: np.ndarray | None, std: np.ndarray | None,
                     centring: bool = True) -> np.ndarray:
    """The LSTM's input for one window ``(T, D)``: normalised (train statistics), optionally centred."""
    batch = torch.from_numpy(np.ascontiguousarray(window, dtype=np.float32))[None]
    return prepare_feature_batch(batch, mean, std, centring)[0].numpy()


def feature_input_dim(feature_dim: int, centring: bool) -> int:
    return 2 * feature_dim if centring else feature_dim


def compensate_camera(flow: np.ndarray, mode: str = "median") -> np.ndarray:
    """Subtract each pair's median (or mean) displacement from flow ``(n, H, W, 2)``: removes camera motion."""
    flow = np.ascontiguousarray(flow, dtype=np.float32)
    return compensate_camera_batch(torch.from_numpy(flow), mode).numpy()


def prepare_flow(flow: np.ndarray, compensation: str = "median") -> np.ndarray:
    """``(L, H, W, 2)`` -> ``(2L, H, W)`` channels u0, v0, u1, v1, ... after camera compensation."""
    return stack_flow(torch.from_numpy(compensate_camera(flow, compensation))[None])[0].numpy()


def prepare_frames(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(n, H, W, 3)`` (or one ``(H, W, 3)``) -> float ``(n, 3, H, W)``, ImageNet-normalised.

    The same preprocessing as extraction (:func:`hpcvid.learn.backbones.preprocess`), in the contiguous layout.
    """
    from hpcvid.learn.backbones import preprocess

    array = np.asarray(frames)
    if array.ndim == 3:
        array = array[None]
    return preprocess(np.ascontiguousarray(array, dtype=np.uint8), channels_last=False)


# ------------------------------------------------------------------------------ augmentation
@dataclass(frozen=True)
class Augment:
    """Random crop at a jittered scale, at the centre or a corner (corner cropping), then a flip.

    The crop is resized back to the input size, so training and evaluation see the same shape and
    evaluation uses the whole stored frame.
    """

    scales: tuple[float, ...] = (1.0, 0.875, 0.75, 0.66)
    flip: bool = True

    def draw(self, rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int, bool]:
        """(top, left, crop_h, crop_w, flip) for one sample (the same for its RGB and its flow)."""
        short = min(height, width)
        crop_h = max(1, int(round(short * self.scales[int(rng.integers(len(self.scales)))])))
        crop_w = max(1, int(round(short * self.scales[int(rng.integers(len(self.scales)))])))
        crop_h, crop_w = min(crop_h, height), min(crop_w, width)
        positions = [((height - crop_h) // 2, (width - crop_w) // 2), (0, 0), (0, width - crop_w),
                     (height - crop_h, 0), (height - crop_h, width - crop_w)]
        top, left = positions[int(rng.integers(len(positions)))]
        flip = bool(self.flip and rng.random() < 0.5)
        return top, left, crop_h, crop_w, flip


def crop_resize(x: torch.Tensor, box: tuple[int, int, int, int, bool], flow_channels: bool = False) -> torch.Tensor:
    """Apply a drawn box to ``(C, H, W)``. For flow, vectors are rescaled and u negated on a flip."""
    return crop_resize_batch(x[None], torch.tensor([[int(v) for v in box]]), flow_channels)[0]


def draw_boxes(augment: Augment | None, rngs: Sequence[np.random.Generator | None], height: int,
               width: int) -> torch.Tensor | None:
    """One box per sample (rows ``top, left, crop_h, crop_w, flip``) from its own random stream; None when
    nothing is augmented (validation, or augmentation off)."""
    if augment is None or any(rng is None for rng in rngs):
        return None
    return torch.tensor([[int(v) for v in augment.draw(rng, height, width)] for rng in rngs], dtype=torch.int64)


# ------------------------------------------------------------------------------ sources
@dataclass(frozen=True)
class VideoItem:
    """One video as the datasets see it: its id, label and number of stored frames."""

    id: str
    label: int
    frames: int
    split: str = "train"


class VideoSource(Protocol):
    """Stored frames and flow of videos (the extraction shards, or arrays in tests)."""

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray: ...  # uint8 (n, H, W, 3)
    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray: ...  # float32 (n, H, W, 2), pair i = (i, i+1)


class MemoryVideoSource:
    """Frames and flow held in arrays: tests and the refeature of small sets."""

    def __init__(self, frames: dict[str, np.ndarray], flow: dict[str, np.ndarray] | None = None) -> None:
        self._frames = frames
        self._flow = flow or {}

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray:
        return self._frames[video_id][list(indices)]

    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray:
        return self._flow[video_id][start:stop]


class _ShardReaders:
    """One :class:`hpcvid.storage.shards.ShardReader` per shard path; each opens its file in the process
    that reads it and travels to DataLoader workers without a handle."""

    def __init__(self) -> None:
        self._readers: dict[str, Any] = {}

    def reader(self, path: str) -> Any:
        if path not in self._readers:
            from hpcvid.storage.shards import ShardReader

            self._readers[path] = ShardReader(path)
        return self._readers[path]

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()


class ShardVideoSource:
    """Frames and flow from the extraction shards, each HDF5 file opened in the process that reads it.

    Beside the one-video reads of :class:`VideoSource` it reads a batch's requests together
    (:meth:`frames_batch`, :meth:`flow_batch`, :meth:`jpeg_batch`), in storage order: by shard, then by
    group, each video's frames or pairs in one HDF5 read.
    """

    def __init__(self, shard_of: dict[str, str]) -> None:
        self.shard_of = dict(shard_of)        # video id -> shard path
        self._readers = _ShardReaders()

    def _reader(self, video_id: str) -> Any:
        return self._readers.reader(self.shard_of[video_id])

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray:
        return self._reader(video_id).frames(video_id, list(indices))

    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray:
        return self._reader(video_id).flow(video_id, start, stop)

    def frames_batch(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray]:
        """Decoded uint8 ``(n, H, W, 3)`` per ``(video id, positions)``, in the asked order."""
        return self._in_storage_order(requests, lambda reader, vid, indices: reader.frames(vid, list(indices)))

    def jpeg_batch(self, requests: Sequence[tuple[str, Sequence[int]]]) -> list[list[np.ndarray]] | None:
        """The undecoded JPEG bytes of each request's frames (for a GPU decoder); None when any video stores
        its frames raw."""
        rows = self._in_storage_order(requests, lambda reader, vid, indices: reader.jpeg(vid, list(indices)))
        return None if any(row is None for row in rows) else rows

    def flow_batch(self, requests: Sequence[tuple[str, int, int]]) -> list[Any]:
        """Each ``(video id, start, stop)``'s pairs as stored (:class:`hpcvid.storage.shards.StoredFlow`)."""
        return self._in_storage_order(requests, lambda reader, vid, start, stop: reader.stored_flow(vid, start, stop))

    def layout(self, video_id: str, part: str) -> Any:
        """The :class:`hpcvid.storage.h5.RowLayout` of a video's ``frames`` or ``flow`` once read."""
        return self._reader(video_id).layout(video_id, part)

    def storage_key(self, video_id: str) -> tuple[str, str]:
        return self.shard_of[video_id], video_id

    def close(self) -> None:
        """Close every file this process opened (before DataLoader workers fork)."""
        self._readers.close()

    def _in_storage_order(self, requests: Sequence[tuple[Any, ...]], read: Callable[..., Any]) -> list[Any]:
        out: list[Any] = [None] * len(requests)
        for k in sorted(range(len(requests)), key=lambda k: self.storage_key(requests[k][0])):
            out[k] = read(self._reader(requests[k][0]), *requests[k])
        return out


class FeatureSource(Protocol):
    """Per-frame features readable as windows (the merged features file, or arrays in tests)."""

    mean: np.ndarray
    std: np.ndarray

    def window(self, index: int, start: int, length: int) -> np.ndarray: ...  # (length, D)


@dataclass(frozen=True)
class FeatureItem:
    index: int          # position in the feature source
    id: str
    label: int
    frames: int
    split: str = "train"


class MemoryFeatureSource:
    """Feature arrays in memory with the same ``window``/``mean``/``std`` interface as the merged file."""

    def __init__(self, arrays: Sequence[np.ndarray], mean: np.ndarray | None = None,
                 std: np.ndarray | None = None) -> None:
        self.arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
        fitted_mean, fitted_std, _ = feature_statistics(self.arrays)
        self.mean = fitted_mean if mean is None else mean
        self.std = fitted_std if std is None else std

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        return self.arrays[index][start:start + length]


class MergedFeatureSource:
    """The merged features file (:class:`hpcvid.storage.merged.MergedFeatures`): items, windows, train mean/std.

    The merged reader opens its HDF5 file lazily in the process that reads (never before a fork).
    """

    def __init__(self, path: str | os.PathLike, name: str | None = None) -> None:
        from hpcvid.storage.merged import MergedFeatures

        self.merged = MergedFeatures(path, name)
        self.mean, self.std = np.asarray(self.merged.mean), np.asarray(self.merged.std)
        self.items = [FeatureItem(i, e.id, int(e.label), int(e.length), e.split)
                      for i, e in enumerate(self.merged.entries)]

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        return self.merged.window(index, start, length)

    def windows(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """A batch's windows ``(index, start, length)``, read in file order (neighbours in one slice)."""
        return self.merged.windows(requests)

    def layout(self, index: int) -> Any:
        return self.merged.layout(index)

    def storage_key(self, index: int) -> int:
        return self.merged.entries[index].offset

    def close(self) -> None:
        self.merged.close()


class ShardFeatureSource:
    """Per-frame features of one named set (``features/<name>``) read from shard files, window by window.

    :meth:`fit_statistics` computes the mean/std over the frames of the given (training) videos only, with
    the rule of :mod:`hpcvid.learn.statistics` (the one the merged file's statistics follow).
    """

    def __init__(self, shards: Sequence[str | os.PathLike], name: str) -> None:
        from hpcvid.storage.shards import ShardReader

        self.name = name
        self.paths: list[str] = []
        self.items: list[FeatureItem] = []
        for path in shards:
            with ShardReader(path) as reader:
                for vid in reader.video_ids():
                    info = reader.info(vid)
                    if name not in info["features"]:
                        continue
                    self.paths.append(str(path))
                    self.items.append(FeatureItem(len(self.items), vid, int(info["label"]), int(info["frames"]),
                                                  str(info.get("split", "train"))))
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None
        self._readers = _ShardReaders()

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        item = self.items[index]
        return self._readers.reader(self.paths[index]).features(item.id, self.name, start, start + length)

    def windows(self, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
        """A batch's windows ``(index, start, length)``, read shard by shard in stored order."""
        out: list[Any] = [None] * len(requests)
        for k in sorted(range(len(requests)), key=lambda k: self.storage_key(requests[k][0])):
            out[k] = self.window(*requests[k])
        return out

    def layout(self, index: int) -> Any:
        item = self.items[index]
        return self._readers.reader(self.paths[index]).layout(item.id, f"features/{self.name}")

    def storage_key(self, index: int) -> tuple[str, str]:
        return self.paths[index], self.items[index].id

    def fit_statistics(self, items: Sequence[FeatureItem]) -> None:
        stats = FeatureStatistics()
        for item in items:
            stats.add(self.window(item.index, 0, item.frames))
        self.mean, self.std, _ = stats.finish()
        self.close()    # no HDF5 handle may stay open in the parent when DataLoader workers fork

    def close(self) -> None:
        self._readers.close()


# ------------------------------------------------------------------------------ a batch's reads, any source
def read_frames(source: VideoSource, requests: Sequence[tuple[str, Sequence[int]]]) -> list[np.ndarray]:
    """Decoded frames of each ``(video id, positions)``: the source's batched read when it has one."""
    batched = getattr(source, "frames_batch", None)
    if batched is not None:
        return batched(requests)
    return [source.frames(vid, indices) for vid, indices in requests]


def read_flow(source: VideoSource, requests: Sequence[tuple[str, int, int]]) -> list[StoredFlow]:
    """Each ``(video id, start, stop)``'s flow pairs as stored (float32 pixels from a source without
    :meth:`ShardVideoSource.flow_batch`)."""
    batched = getattr(source, "flow_batch", None)
    if batched is not None:
        return batched(requests)
    return [StoredFlow(np.asarray(source.flow(vid, start, stop), dtype=np.float32)) for vid, start, stop in requests]


def read_windows(source: FeatureSource, requests: Sequence[tuple[int, int, int]]) -> list[np.ndarray]:
    """Feature windows ``(index, start, length)``: the source's batched read when it has one."""
    batched = getattr(source, "windows", None)
    if batched is not None:
        return batched(requests)
    return [source.window(index, start, length) for index, start, length in requests]


def one_line_errors(batches: Iterable[Any]) -> Iterator[Any]:
    """Iterate a DataLoader; an hpcvid error raised in one of its workers comes out as its own one line.

    torch re-raises a worker's exception in the main process as ``type(exc)(text)``, where ``text`` pastes
    the worker's whole traceback into the message; the user would see that instead of the line that
    names the file and the fix. The original message is the traceback's last line.
    """
    try:
        yield from batches
    except HpcvidError as exc:
        text = str(exc)
        if not text.startswith("Caught ") or "Traceback" not in text:
            raise
        prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
        last = text.rstrip().rsplit("\n", 1)[-1]
        try:
            error = type(exc)(last[len(prefix):] if last.startswith(prefix) else last)
        except TypeError:  # an error type with another constructor: keep torch's text
            raise exc from None
        raise error from None


# ------------------------------------------------------------------------------ datasets
class _EpochDataset(Dataset):
    """Shared bits: items, labels, a per-(seed, epoch, index) random stream when training, and the batched
    interface the trainer reads through.

    A batch is made in two steps: :meth:`load_batch` reads and decodes the samples and draws their random
    windows and crops (``(seed, epoch, index)`` streams: the same whichever process does it), returning
    tensors as stored (uint8 frames or JPEG bytes, stored flow, feature rows); :meth:`prepare_batch` turns
    them into model inputs with batched tensor operations on any device. ``dataset[i]`` is the batch of one,
    so a sample is the same alone, in a batch, in a worker or on the training process.
    """

    parts: tuple[str, ...] = ()       # what it reads of each video: "frames", "flow" or "features" (cache keys)

    def __init__(self, items: Sequence[Any], train: bool, seed: int) -> None:
        self.items = list(items)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.decode_later = False     # hand JPEG bytes to prepare_batch (a GPU decodes them) instead of pixels

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def rng(self, index: int, epoch: int | None = None) -> np.random.Generator | None:
        return item_rng(self.seed, self.epoch if epoch is None else epoch, index) if self.train else None

    @property
    def labels(self) -> list[int]:
        return [item.label for item in self.items]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        *inputs, labels = self.batch([index])
        return (*(x[0] for x in inputs), int(labels[0]))

    def batch(self, indices: Sequence[int], epoch: int | None = None, device: Any = None) -> tuple[torch.Tensor, ...]:
        """Model inputs and labels of ``indices``, stacked: ``prepare_batch(load_batch(...))``."""
        return self.prepare_batch(self.load_batch(indices, epoch), device)

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        raise NotImplementedError

    def prepare_batch(self, raw: dict[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _labels(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.tensor([self.items[i].label for i in indices], dtype=torch.int64)

    # what an in-memory cache needs to know (hpcvid.learn.cache)
    def cache_layout(self) -> dict[tuple[str, Any], Any] | None:
        """The rows a cache would hold for this dataset's videos, ``(part, key) -> RowLayout``; None when its
        source cannot say (it is then read uncached)."""
        return None

    def use_cache(self, cache: Any) -> None:
        """Read through ``cache`` (a :class:`hpcvid.learn.cache.RowCache` made from :meth:`cache_layout`)."""
        raise NotImplementedError

    def storage_order(self) -> list[int]:
        """Positions of the items sorted by where the source stores them (for locality-keeping shuffles)."""
        key = getattr(getattr(self, "source", None), "storage_key", None)
        if key is None:
            return list(range(len(self.items)))
        return sorted(range(len(self.items)), key=lambda i: key(self._key(self.items[i])))

    def _key(self, item: Any) -> Any:
        return item.id


class VideoSourceDataset(_EpochDataset):
    """A dataset over a :class:`VideoSource` (the frame, flow and two-stream datasets, and TSN, C3D and the
    CNN-LSTM's): its decoded frames and stored flow can be cached in memory (:mod:`hpcvid.learn.cache`), for
    the parts of each video it reads (:attr:`parts`)."""

    source: VideoSource

    def cache_layout(self) -> dict[tuple[str, Any], Any] | None:
        """Sized from the first video (an extraction stores every video at one size; a video of another size
        is never cached) and each video's number of frames."""
        layout = getattr(self.source, "layout", None)
        if layout is None or not self.items:
            return None
        out = {}
        for part in self.parts:
            first = layout(self.items[0].id, part)
            for item in self.items:
                out[(part, item.id)] = first._replace(rows=max(0, item.frames - 1 if part == "flow" else item.frames))
        return out

    def use_cache(self, cache: Any) -> None:
        from hpcvid.learn.cache import CachedVideoSource

        self.source = CachedVideoSource(self.source, cache)


class _VideoDataset(VideoSourceDataset):
    """What the frame and flow datasets share: reading a batch's frames (decoded, or as JPEG bytes for a GPU
    decoder) and flow windows, and turning them into inputs."""

    def _read_frames(self, requests: Sequence[tuple[str, Sequence[int]]]) -> tuple[dict[str, Any], tuple[int, int]]:
        """``{"frames": uint8 (B, H, W, 3)}``, or ``{"jpeg", "jpeg_offsets"}`` when decoding is left to
        :meth:`prepare_batch`; and (H, W)."""
        jpeg = getattr(self.source, "jpeg_batch", None)
        layout = getattr(self.source, "layout", None)
        rows = jpeg(requests) if self.decode_later and jpeg is not None and layout is not None else None
        if rows is not None:
            flat = [row for video in rows for row in video]
            offsets = np.cumsum([0] + [len(row) for row in flat], dtype=np.int64)
            height, width = layout(requests[0][0], "frames").shape[:2]
            return {"jpeg": torch.from_numpy(np.concatenate(flat)), "jpeg_offsets": torch.from_numpy(offsets)}, \
                (height, width)
        frames = _stack([np.asarray(f) for f in read_frames(self.source, requests)], "frames")
        return {"frames": torch.from_numpy(frames.reshape((-1,) + frames.shape[-3:]))}, frames.shape[-3:-1]

    def _read_flow(self, items: Sequence[VideoItem], rngs: Sequence[np.random.Generator | None]
                   ) -> tuple[dict[str, Any], list[int]]:
        """``stack`` stored flow fields per item (ping-pong padded when the video has fewer pairs), a random
        window in training and the centre one otherwise: ``{"flow", "scale", "offset"}`` and the starts."""
        starts, requests, pads = [], [], []
        for item, rng in zip(items, rngs):
            pairs = max(1, item.frames - 1)
            start = window_start(pairs, self.stack, rng)
            starts.append(start)
            if pairs >= self.stack:
                requests.append((item.id, start, start + self.stack))
                pads.append(None)
            else:
                requests.append((item.id, 0, pairs))
                pads.append(ping_pong_indices(pairs, self.stack))
        stored = read_flow(self.source, requests)
        if len({s.values.dtype for s in stored}) > 1:      # videos stored differently: pixels for all
            stored = [StoredFlow(s.pixels()) for s in stored]
        values = _stack([s.values if pad is None else s.values[pad] for s, pad in zip(stored, pads)], "flow fields")
        return {"flow": torch.from_numpy(values), "scale": torch.tensor([float(s.scale) for s in stored]),
                "offset": torch.tensor([float(s.offset) for s in stored])}, starts

    def _pixels(self, raw: dict[str, Any], device: Any) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` on ``device``: decoded there, or the decoded frames moved there."""
        if "jpeg" in raw:
            return decode_jpeg_batch(raw["jpeg"], raw["jpeg_offsets"], device or "cpu")
        return raw["frames"].to(device or "cpu", non_blocking=True).permute(0, 3, 1, 2)

    def _flow_stack(self, raw: dict[str, Any], device: Any) -> torch.Tensor:
        """Stored flow -> pixels -> camera motion removed -> ``(B, 2L, H, W)`` on ``device``."""
        values = raw["flow"].to(device or "cpu", non_blocking=True)
        flow = dequantise_flow(values, raw["scale"], raw["offset"])
        return stack_flow(compensate_camera_batch(flow, self.compensation, values, raw["scale"], raw["offset"]))


class FrameDataset(_VideoDataset):
    """One frame per video: a random frame in training (augmented), the middle frame in validation.

    The middle frame, not the first: a growing object's first frame leaks its size (measured on the synthetic set).
    """

    parts = ("frames",)

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, train: bool, seed: int = 0,
                 augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.augment = source, augment

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        items, rngs = [self.items[i] for i in indices], [self.rng(i, epoch) for i in indices]
        frames = [int(rng.integers(item.frames)) if rng is not None else item.frames // 2
                  for item, rng in zip(items, rngs)]
        raw, (height, width) = self._read_frames([(item.id, [frame]) for item, frame in zip(items, frames)])
        raw.update(labels=self._labels(indices), boxes=draw_boxes(self.augment, rngs, height, width))
        return raw

    def prepare_batch(self, raw: dict[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
        images = normalise_frames(self._pixels(raw, device))
        if raw.get("boxes") is not None:
            images = crop_resize_batch(images, raw["boxes"])
        return images, raw["labels"].to(images.device)


class FlowDataset(_VideoDataset):
    """A stack of ``stack`` consecutive flow fields: a random window in training, the centre one otherwise."""

    parts = ("flow",)

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, stack: int, train: bool,
                 seed: int = 0, compensation: str = "median", augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.stack, self.compensation, self.augment = source, stack, compensation, augment

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        items, rngs = [self.items[i] for i in indices], [self.rng(i, epoch) for i in indices]
        raw, _ = self._read_flow(items, rngs)
        height, width = raw["flow"].shape[2:4]
        raw.update(labels=self._labels(indices), boxes=draw_boxes(self.augment, rngs, height, width))
        return raw

    def prepare_batch(self, raw: dict[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
        stack = self._flow_stack(raw, device)
        if raw.get("boxes") is not None:
            stack = crop_resize_batch(stack, raw["boxes"], flow_channels=True)
        return stack, raw["labels"].to(stack.device)


class TwoStreamDataset(_VideoDataset):
    """A flow stack and the RGB frame in its middle, cropped and flipped together."""

    parts = ("frames", "flow")

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, stack: int, train: bool,
                 seed: int = 0, compensation: str = "median", augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.stack, self.compensation, self.augment = source, stack, compensation, augment

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        items, rngs = [self.items[i] for i in indices], [self.rng(i, epoch) for i in indices]
        raw, starts = self._read_flow(items, rngs)
        middles = [min(item.frames - 1, start + self.stack // 2) for item, start in zip(items, starts)]
        frames, _ = self._read_frames([(item.id, [middle]) for item, middle in zip(items, middles)])
        height, width = raw["flow"].shape[2:4]
        raw.update(frames, labels=self._labels(indices), boxes=draw_boxes(self.augment, rngs, height, width))
        return raw

    def prepare_batch(self, raw: dict[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
        stack = self._flow_stack(raw, device)
        images = resize_to(normalise_frames(self._pixels(raw, device)), stack.shape[-2:])
        if raw.get("boxes") is not None:
            images = crop_resize_batch(images, raw["boxes"])
            stack = crop_resize_batch(stack, raw["boxes"], flow_channels=True)
        return images, stack, raw["labels"].to(stack.device)


class FeatureDataset(_EpochDataset):
    """Windows of ``seq_len`` prepared features for the LSTM (ping-pong padded when short)."""

    parts = ("features",)

    def __init__(self, source: FeatureSource, items: Sequence[FeatureItem], *, seq_len: int, train: bool,
                 seed: int = 0, centring: bool = True) -> None:
        super().__init__(items, train, seed)
        self.source, self.seq_len, self.centring = source, seq_len, centring

    def load_batch(self, indices: Sequence[int], epoch: int | None = None) -> dict[str, Any]:
        requests, pads = [], []
        for i in indices:
            item, rng = self.items[i], self.rng(i, epoch)
            if item.frames >= self.seq_len:
                requests.append((item.index, window_start(item.frames, self.seq_len, rng), self.seq_len))
                pads.append(None)
            else:
                requests.append((item.index, 0, item.frames))
                pads.append(ping_pong_indices(item.frames, self.seq_len))
        windows = [np.asarray(w, dtype=np.float32) if pad is None else np.asarray(w, dtype=np.float32)[pad]
                   for w, pad in zip(read_windows(self.source, requests), pads)]
        return {"features": torch.from_numpy(_stack(windows, "feature windows")), "labels": self._labels(indices)}

    def prepare_batch(self, raw: dict[str, Any], device: Any = None) -> tuple[torch.Tensor, ...]:
        x = prepare_feature_batch(raw["features"].to(device or "cpu", non_blocking=True), self.source.mean,
                                  self.source.std, self.centring)
        return x, raw["labels"].to(x.device)

    def use_cache(self, cache: Any) -> None:
        from hpcvid.learn.cache import CachedFeatureSource

        self.source = CachedFeatureSource(self.source, cache)

    def cache_layout(self) -> dict[tuple[str, Any], Any] | None:
        layout = getattr(self.source, "layout", None)
        if layout is None or not self.items:
            return None
        first = layout(self.items[0].index)
        return {("features", item.index): first._replace(rows=item.frames) for item in self.items}

    def _key(self, item: Any) -> Any:
        return item.index


def _stack(arrays: Sequence[np.ndarray], what: str) -> np.ndarray:
    """One array of a batch's samples; samples of different sizes are refused with the sizes found."""
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise StoreError(f"the {what} of one batch have different sizes {sorted(shapes)}: extract every video at "
                         "one size (extract.resize = \"square\") to train on them together")
    return np.stack(arrays)


# ------------------------------------------------------------------------------ splits
def hold_out(items: Sequence[Any], fraction: float, seed: int = 0,
             label_of: Callable[[Any], int] = lambda item: item.label) -> tuple[list[Any], list[Any]]:
    """Split the train split into (train, validation), per class, deterministically (ids sorted, seeded).

    Validation never touches the test split. Each class with at least two videos gives
    ``max(1, round(fraction * n))`` of them to validation.
    """
    if fraction <= 0:
        return list(items), []
    by_class: dict[int, list[Any]] = {}
    for item in sorted(items, key=lambda it: it.id):
        by_class.setdefault(label_of(item), []).append(item)
    train, val = [], []
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        members = by_class[label]
        order = rng.permutation(len(members))
        n_val = max(1, int(round(fraction * len(members)))) if len(members) >= 2 else 0
        chosen = set(order[:n_val].tolist())
        for i, item in enumerate(members):
            (val if i in chosen else train).append(item)
    return train, val
