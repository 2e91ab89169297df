"""What the models eat: frames, flow stacks and feature windows, and the input preparation shared with eval.

Input preparation (evaluation must call the same functions, so it sees exactly what training saw):

* :func:`prepare_frames` - uint8 ``(n, H, W, 3)`` -> float ``(n, 3, H, W)``, ImageNet mean/std.
* :func:`prepare_flow`   - float ``(L, H, W, 2)`` -> ``(2L, H, W)``; camera motion removed first by
  subtracting each pair's median (or mean) displacement (DESIGN 8: raw flow with jitter got 19 %, compensated
  flow 97-99 %).
* :func:`prepare_features` - ``(T, D)`` -> ``(T, 2D)``: standardised with the train mean/std of
  :mod:`hpcvid.learn.statistics` (std floored scale-relatively: untrained GoogLeNet features are ~1e-12),
  then centred in time with the clip's mean appended (centring took the LSTM from 50-73 % to 93-99 %).

Sequences: videos shorter than the window are padded by playing them backwards and forwards
(:func:`ping_pong_indices`); longer ones give a random window in training and the centre window in
validation (:func:`sequence_indices`). Randomness comes from ``(seed, epoch, index)``, never from global
state, so an epoch replays identically after a resume and with any number of DataLoader workers.

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
from torch.nn import functional as F
from torch.utils.data import Dataset

from hpcvid.errors import HpcvidError
from hpcvid.learn.statistics import FeatureStatistics, feature_statistics, normalise_features


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
    x = np.asarray(window, dtype=np.float32)
    if mean is not None and std is not None:
        x = normalise_features(x, mean, std)
    return centre_in_time(x) if centring else x


def feature_input_dim(feature_dim: int, centring: bool) -> int:
    return 2 * feature_dim if centring else feature_dim


def compensate_camera(flow: np.ndarray, mode: str = "median") -> np.ndarray:
    """Subtract each pair's median (or mean) displacement from flow ``(n, H, W, 2)``: removes camera motion."""
    flow = np.asarray(flow, dtype=np.float32)
    if mode == "none":
        return flow
    reduce = np.median if mode == "median" else np.mean
    if mode not in ("median", "mean"):
        raise ValueError(f"unknown camera compensation {mode!r}; choose median, mean or none")
    return flow - reduce(flow, axis=(1, 2), keepdims=True).astype(np.float32)


def prepare_flow(flow: np.ndarray, compensation: str = "median") -> np.ndarray:
    """``(L, H, W, 2)`` -> ``(2L, H, W)`` channels u0, v0, u1, v1, ... after camera compensation."""
    flow = compensate_camera(flow, compensation)
    steps, height, width, _ = flow.shape
    return np.ascontiguousarray(flow.transpose(0, 3, 1, 2).reshape(2 * steps, height, width))


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
    top, left, crop_h, crop_w, flip = box
    height, width = x.shape[-2:]
    out = x[:, top:top + crop_h, left:left + crop_w]
    if (crop_h, crop_w) != (height, width):
        out = F.interpolate(out[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    if flip:
        out = out.flip(-1)
    if flow_channels:
        scale = torch.tensor([width / crop_w, height / crop_h], dtype=out.dtype).repeat(out.shape[0] // 2)
        sign = torch.tensor([-1.0 if flip else 1.0, 1.0], dtype=out.dtype).repeat(out.shape[0] // 2)
        out = out * (scale * sign).view(-1, 1, 1)
    return out.contiguous()


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
    """Frames and flow from the extraction shards, each HDF5 file opened in the process that reads it."""

    def __init__(self, shard_of: dict[str, str]) -> None:
        self.shard_of = dict(shard_of)        # video id -> shard path
        self._readers = _ShardReaders()

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray:
        return self._readers.reader(self.shard_of[video_id]).frames(video_id, list(indices))

    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray:
        return self._readers.reader(self.shard_of[video_id]).flow(video_id, start, stop)


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

    def fit_statistics(self, items: Sequence[FeatureItem]) -> None:
        stats = FeatureStatistics()
        for item in items:
            stats.add(self.window(item.index, 0, item.frames))
        self.mean, self.std, _ = stats.finish()
        self.close()    # no HDF5 handle may stay open in the parent when DataLoader workers fork

    def close(self) -> None:
        self._readers.close()


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
    """Shared bits: items, labels, a per-(seed, epoch, index) random stream when training."""

    def __init__(self, items: Sequence[Any], train: bool, seed: int) -> None:
        self.items = list(items)
        self.train = train
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def rng(self, index: int) -> np.random.Generator | None:
        return item_rng(self.seed, self.epoch, index) if self.train else None

    @property
    def labels(self) -> list[int]:
        return [item.label for item in self.items]


def _flow_window(source: VideoSource, item: VideoItem, stack: int, rng: np.random.Generator | None,
                 compensation: str) -> tuple[np.ndarray, int]:
    """``stack`` flow fields (ping-pong padded if the video has fewer pairs); returns (2L, H, W), start."""
    pairs = max(1, item.frames - 1)
    start = window_start(pairs, stack, rng)
    if pairs >= stack:
        flow = source.flow(item.id, start, start + stack)
    else:
        flow = source.flow(item.id, 0, pairs)[ping_pong_indices(pairs, stack)]
    return prepare_flow(flow, compensation), start


class FrameDataset(_EpochDataset):
    """One frame per video: a random frame in training (augmented), the middle frame in validation.

    The middle frame, not the first: a growing object's first frame leaks its size (DESIGN 8).
    """

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, train: bool, seed: int = 0,
                 augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.augment = source, augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        frame = int(rng.integers(item.frames)) if rng is not None else item.frames // 2
        image = prepare_frames(self.source.frames(item.id, [frame]))[0]
        if rng is not None and self.augment is not None:
            image = crop_resize(image, self.augment.draw(rng, *image.shape[-2:]))
        return image, item.label


class FlowDataset(_EpochDataset):
    """A stack of ``stack`` consecutive flow fields: a random window in training, the centre one otherwise."""

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, stack: int, train: bool,
                 seed: int = 0, compensation: str = "median", augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.stack, self.compensation, self.augment = source, stack, compensation, augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        flow, _ = _flow_window(self.source, item, self.stack, rng, self.compensation)
        stack = torch.from_numpy(flow)
        if rng is not None and self.augment is not None:
            stack = crop_resize(stack, self.augment.draw(rng, *stack.shape[-2:]), flow_channels=True)
        return stack, item.label


class TwoStreamDataset(_EpochDataset):
    """A flow stack and the RGB frame in its middle, cropped and flipped together."""

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, stack: int, train: bool,
                 seed: int = 0, compensation: str = "median", augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.stack, self.compensation, self.augment = source, stack, compensation, augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        flow, start = _flow_window(self.source, item, self.stack, rng, self.compensation)
        middle = min(item.frames - 1, start + self.stack // 2)
        image = prepare_frames(self.source.frames(item.id, [middle]))[0]
        stack = torch.from_numpy(flow)
        if image.shape[-2:] != stack.shape[-2:]:
            image = F.interpolate(image[None], size=tuple(stack.shape[-2:]), mode="bilinear",
                                  align_corners=False)[0]
        if rng is not None and self.augment is not None:
            box = self.augment.draw(rng, *stack.shape[-2:])
            image, stack = crop_resize(image, box), crop_resize(stack, box, flow_channels=True)
        return image, stack, item.label


class FeatureDataset(_EpochDataset):
    """Windows of ``seq_len`` prepared features for the LSTM (ping-pong padded when short)."""

    def __init__(self, source: FeatureSource, items: Sequence[FeatureItem], *, seq_len: int, train: bool,
                 seed: int = 0, centring: bool = True) -> None:
        super().__init__(items, train, seed)
        self.source, self.seq_len, self.centring = source, seq_len, centring

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        if item.frames >= self.seq_len:
            start = window_start(item.frames, self.seq_len, rng)
            window = self.source.window(item.index, start, self.seq_len)
        else:
            window = self.source.window(item.index, 0, item.frames)[ping_pong_indices(item.frames, self.seq_len)]
        x = prepare_features(window, self.source.mean, self.source.std, self.centring)
        return torch.from_numpy(x), item.label


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
