"""What the segment, clip and frame-sequence models eat: TSN snippets, C3D clips, CNN-LSTM frame sequences.

Built on the public parts of :mod:`hpcvid.learn.datasets` (a :class:`VideoSource`'s ``frames`` and ``flow``,
``prepare_frames``, ``prepare_flow``, ``Augment`` and ``crop_resize``, ``sequence_indices``) so that evaluation
prepares inputs with the same functions as training, and randomness comes from ``(seed, epoch, index)``.

* :class:`SegmentDataset` (TSN): the video is cut into K equal segments and one snippet is taken from
  each (:func:`segment_starts`): at a random place in its segment in training, at its centre otherwise.
  A snippet is one RGB frame, a stack of L camera-compensated flow fields, or the L differences of L + 1
  consecutive RGB frames. One crop box (corner cropping with scale and aspect jittering: ``Augment``)
  serves every snippet of a sample, so the segments stay aligned.
* :class:`ClipDataset` (C3D): T consecutive frames (a random window in training, the centre one otherwise,
  played backwards and forwards when the video is shorter), cropped to a square of ``crop`` times the
  short side at a random place in training and at the centre otherwise (C3D: 112 px of 128), not resized.
* :class:`FrameSequenceDataset` (CNN-LSTM): T consecutive frames like a clip, the whole frame with one
  ``Augment`` box for all of them.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from hpcvid.learn.datasets import (Augment, VideoItem, VideoSource, VideoSourceDataset, crop_resize,
                                   ping_pong_indices, prepare_flow, prepare_frames, sequence_indices)

MODALITIES = ("rgb", "flow", "diff")


# ------------------------------------------------------------------------------ index arithmetic
def segment_starts(available: int, length: int, segments: int, rng: np.random.Generator | None = None) -> list[int]:
    """Start of one snippet of ``length`` in each of ``segments`` equal parts of the valid starts.

    The ``available - length + 1`` starts (at least one) are cut into equal parts; training (``rng``) takes a
    uniform start inside each part, evaluation its centre. ``segment_starts(16, 1, 3) == [2, 8, 13]``.
    A video with fewer starts than segments repeats starts rather than leave a segment out.
    """
    starts = max(1, available - length + 1)
    tick = starts / segments
    if rng is None:
        return [min(starts - 1, int(tick * (k + 0.5))) for k in range(segments)]
    return [min(starts - 1, int(tick * k + rng.random() * tick)) for k in range(segments)]


def covering_starts(available: int, length: int, stride: int) -> list[int]:
    """Window starts 0, stride, 2 * stride, ... and the last full window; one start when the video is short."""
    if available <= length:
        return [0]
    starts = list(range(0, available - length + 1, stride))
    if starts[-1] != available - length:
        starts.append(available - length)
    return starts


def square_crop(height: int, width: int, fraction: float, rng: np.random.Generator | None) -> tuple[int, int, int]:
    """(top, left, side) of a square crop of ``fraction`` of the short side: anywhere in training, centred otherwise."""
    side = max(1, min(height, width, int(round(fraction * min(height, width)))))
    if rng is None:
        return (height - side) // 2, (width - side) // 2, side
    return int(rng.integers(height - side + 1)), int(rng.integers(width - side + 1)), side


# ------------------------------------------------------------------------------ input preparation
def prepare_differences(frames: np.ndarray) -> torch.Tensor:
    """uint8 ``(L + 1, H, W, 3)`` -> ``(3L, H, W)``: the differences of consecutive preprocessed frames.

    The ImageNet mean cancels in a difference; what is left is the change, in the scale of the frames.
    """
    x = prepare_frames(frames)
    return (x[1:] - x[:-1]).flatten(0, 1).contiguous()


def read_snippets(source: VideoSource, item: VideoItem, modality: str, starts: Sequence[int], stack: int,
                  compensation: str) -> torch.Tensor:
    """The snippets starting at frames (or flow pairs) ``starts``, as the TSN trunk takes them ``(n, c, H, W)``.

    The frames of every snippet come in one read (each stored frame decoded once); flow comes a stack at a time.
    """
    if modality == "flow":
        pairs = max(1, item.frames - 1)
        stacks = []
        for start in starts:
            if start + stack <= pairs:
                flow = source.flow(item.id, start, start + stack)
            else:
                flow = source.flow(item.id, 0, pairs)[_indices(pairs, start, stack)]
            stacks.append(torch.from_numpy(prepare_flow(flow, compensation)))
        return torch.stack(stacks)
    wanted = [[s] if modality == "rgb" else _indices(item.frames, s, stack + 1) for s in starts]
    unique = sorted({i for indices in wanted for i in indices})
    frames = source.frames(item.id, unique)
    row = {index: k for k, index in enumerate(unique)}
    if modality == "rgb":
        return prepare_frames(frames[[row[s] for s in starts]])
    return torch.stack([prepare_differences(frames[[row[i] for i in indices]]) for indices in wanted])


def _indices(available: int, start: int, length: int) -> list[int]:
    """``length`` indices from ``start``; a video too short is played backwards and forwards from its start."""
    if start + length <= available:
        return list(range(start, start + length))
    return ping_pong_indices(available, length)


def snippet_extent(modality: str, stack: int) -> int:
    """How many frames (or, for flow, flow pairs) one snippet spans from its start."""
    return 1 if modality == "rgb" else stack + 1 if modality == "diff" else stack


# ------------------------------------------------------------------------------ datasets
class SegmentDataset(VideoSourceDataset):
    """K snippets per video, one per segment (see the module docstring): ``(K, c, H, W)`` and the label."""

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, modality: str, segments: int,
                 stack: int, train: bool, seed: int = 0, compensation: str = "median",
                 augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        if modality not in MODALITIES:
            raise ValueError(f"unknown TSN modality {modality!r}; choose one of {', '.join(MODALITIES)}")
        self.source, self.modality, self.segments, self.stack = source, modality, segments, stack
        self.compensation, self.augment = compensation, augment
        self.parts = ("flow",) if modality == "flow" else ("frames",)

    def positions(self, item: VideoItem) -> int:
        """Frames (flow pairs for flow) a snippet can be taken from."""
        return max(1, item.frames - 1) if self.modality == "flow" else item.frames

    def starts(self, item: VideoItem, count: int, rng: np.random.Generator | None = None) -> list[int]:
        return segment_starts(self.positions(item), snippet_extent(self.modality, self.stack), count, rng)

    def snippets(self, item: VideoItem, starts: Sequence[int], rng: np.random.Generator | None = None) -> torch.Tensor:
        """The snippets at ``starts`` ``(n, c, H, W)``; with ``rng`` and an augmentation, one box crops them all."""
        stacked = read_snippets(self.source, item, self.modality, starts, self.stack, self.compensation)
        if rng is not None and self.augment is not None:
            box = self.augment.draw(rng, *stacked.shape[-2:])
            count, channels = stacked.shape[:2]
            stacked = crop_resize(stacked.flatten(0, 1), box, flow_channels=self.modality == "flow")
            stacked = stacked.view(count, channels, *stacked.shape[-2:])
        return stacked

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        return self.snippets(item, self.starts(item, self.segments, rng), rng), item.label


class ClipDataset(VideoSourceDataset):
    """A clip of ``length`` consecutive frames, square-cropped: ``(3, T, side, side)`` and the label."""

    parts = ("frames",)

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, length: int, crop: float, train: bool,
                 seed: int = 0, flip: bool = False) -> None:
        super().__init__(items, train, seed)
        self.source, self.length, self.crop, self.flip = source, length, crop, flip

    def clip(self, item: VideoItem, indices: Sequence[int], rng: np.random.Generator | None = None) -> torch.Tensor:
        """The frames at ``indices`` as one clip; the crop is random with ``rng``, else centred."""
        frames = self.source.frames(item.id, list(indices))
        top, left, side = square_crop(frames.shape[1], frames.shape[2], self.crop, rng)
        frames = frames[:, top:top + side, left:left + side]
        if rng is not None and self.flip and rng.random() < 0.5:
            frames = frames[:, :, ::-1]
        return prepare_frames(frames).transpose(0, 1).contiguous()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        return self.clip(item, sequence_indices(item.frames, self.length, rng), rng), item.label


class FrameSequenceDataset(VideoSourceDataset):
    """``length`` consecutive whole frames ``(T, 3, H, W)`` and the label; one augmentation box for all."""

    parts = ("frames",)

    def __init__(self, source: VideoSource, items: Sequence[VideoItem], *, length: int, train: bool, seed: int = 0,
                 augment: Augment | None = None) -> None:
        super().__init__(items, train, seed)
        self.source, self.length, self.augment = source, length, augment

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item, rng = self.items[index], self.rng(index)
        frames = prepare_frames(self.source.frames(item.id, sequence_indices(item.frames, self.length, rng)))
        if rng is not None and self.augment is not None:
            box = self.augment.draw(rng, *frames.shape[-2:])
            frames = crop_resize(frames.flatten(0, 1), box).view(frames.shape)
        return frames, item.label


def batches(inputs: Sequence[Any], size: int) -> list[list[Any]]:
    """``inputs`` in groups of at most ``size`` (forward passes of bounded memory in evaluation)."""
    return [list(inputs[i:i + size]) for i in range(0, len(inputs), max(1, size))]
