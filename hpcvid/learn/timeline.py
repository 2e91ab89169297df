"""Windows of a long video, each scored by a model's own scorer as if it were a short video of its own.

A timeline slides a window of ``window`` kept frames over a video in steps of ``stride`` and asks the
model's evaluation scorer (its kind's ``Scorer``, default strategy) for class scores of each window. The
scorer reads what it reads (frames, flow, features) through a view of the video's source that starts
at the window's first frame and is ``window`` frames long, so every kind, present or future, gets a
timeline without code of its own: a window is scored exactly as a test video of that length would be.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import numpy as np

from hpcvid.learn.kinds import EvalInputs


@dataclass(frozen=True)
class Window:
    """Kept frames ``start`` to ``stop`` (exclusive) of video ``video``, scored under the id ``id``."""

    id: str
    video: str
    start: int
    stop: int
    label: int = -1


def sliding_windows(frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """(start, stop) of each window: 0, stride, 2 * stride, ... and one that ends at the last frame, so
    the whole video is covered; one window of the whole video when it is no longer than ``window``."""
    if frames <= window:
        return [(0, frames)]
    starts = list(range(0, frames - window + 1, max(1, stride)))
    if starts[-1] != frames - window:
        starts.append(frames - window)
    return [(start, start + window) for start in starts]


def window_id(video: str, start: int, stop: int) -> str:
    return f"{video}@{start}:{stop}"


class WindowVideoSource:
    """Frames and flow of windows: window ``id``'s frame ``i`` is frame ``start + i`` of its video."""

    def __init__(self, source: Any, windows: Sequence[Window]) -> None:
        self.source = source
        self.windows = {w.id: w for w in windows}

    def frames(self, video_id: str, indices: Sequence[int]) -> np.ndarray:
        window = self.windows[video_id]
        return self.source.frames(window.video, [window.start + int(i) for i in indices])

    def flow(self, video_id: str, start: int, stop: int) -> np.ndarray:
        window = self.windows[video_id]
        return self.source.flow(window.video, window.start + start, window.start + stop)


class WindowFeatureSource:
    """Feature windows of windows; ``mean``/``std`` are set by the scorer, as on any feature source."""

    def __init__(self, source: Any, windows: Sequence[tuple[int, int]]) -> None:
        self.source = source
        self.windows = list(windows)            # per window index: (index in ``source``, first frame)
        self.mean: np.ndarray | None = None
        self.std: np.ndarray | None = None

    def window(self, index: int, start: int, length: int) -> np.ndarray:
        base, first = self.windows[index]
        return self.source.window(base, first + start, length)


def window_inputs(inputs: EvalInputs, windows: Sequence[Window], reads_features: bool) -> EvalInputs:
    """The scorer's inputs for ``windows`` of the videos of ``inputs`` (what a kind's Scorer is given)."""
    if reads_features:
        bases = []
        videos: dict[str, Any] = {}
        for position, w in enumerate(windows):
            item = inputs.videos[w.video]
            bases.append((item.index, w.start))
            videos[w.id] = replace(item, index=position, id=w.id, frames=w.stop - w.start)
        return EvalInputs(WindowFeatureSource(inputs.source, bases), videos)
    videos = {w.id: {**inputs.videos[w.video], "frames": w.stop - w.start} for w in windows}
    return EvalInputs(WindowVideoSource(inputs.source, windows), videos)


def score_windows(make_scorer: Any, inputs: EvalInputs, video: str, frames: int, window: int, stride: int,
                  reads_features: bool) -> tuple[list[Window], np.ndarray]:
    """The windows of ``video`` and their ``(W, C)`` scores under the scorer's default strategy.

    ``make_scorer(inputs)`` builds the kind's scorer for the given inputs.
    """
    windows = [Window(window_id(video, a, b), video, a, b) for a, b in sliding_windows(frames, window, stride)]
    scorer = make_scorer(window_inputs(inputs, windows, reads_features))
    return windows, np.stack([scorer.score(w)[scorer.default] for w in windows]).astype(np.float32)
