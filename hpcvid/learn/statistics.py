"""Feature statistics: the train split's per-dimension mean and std, and the one rule that keeps std usable.

Used wherever features are standardised: the merge stage stores them in the merged file, the trainer fits
them on the training videos when it reads shards, and :func:`normalise_features` applies them.

The rule: std is floored at ``RELATIVE_STD_FLOOR`` x the root-mean-square of the features themselves.
The floor has to follow the data's scale: untrained GoogLeNet's features are ~1e-12, so any fixed epsilon
(std + 1e-6, LayerNorm's 1e-5) is larger than every std and crushes the inputs to ~0. One millionth of
the RMS is about ten float32 rounding steps of a typical value: a dimension that varies less than that
is constant or rounding noise and is damped instead of being blown up to unit variance; every other
dimension is standardised exactly.

numpy only (no torch), so that stages import it cheaply.
"""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

RELATIVE_STD_FLOOR = 1e-6


class FeatureStatistics:
    """Mean and variance accumulated video by video in float64 (Chan et al.'s pairwise update, stable for
    features of any scale and offset); :meth:`finish` applies the std floor."""

    def __init__(self) -> None:
        self.count = 0
        self.videos = 0
        self.mean: np.ndarray | None = None
        self.m2: np.ndarray | None = None
        self.square_sum = 0.0

    def add(self, values: np.ndarray) -> None:
        """One video's ``(T, D)`` features (an empty one is skipped)."""
        if len(values) == 0:
            return
        x = np.asarray(values, dtype=np.float64)
        n, mean = len(x), x.mean(axis=0)
        m2 = ((x - mean) ** 2).sum(axis=0)
        self.square_sum += float((x ** 2).sum())
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * (n / total)
            self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
            self.count = total
        self.videos += 1

    def finish(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """(mean, floored std) as float32 ``(D,)``, and what was used: n_frames, n_videos, rms, epsilon."""
        if self.mean is None or self.m2 is None:
            raise ValueError("no frames to compute feature statistics from")
        std = np.sqrt(self.m2 / self.count)
        rms = np.sqrt(self.square_sum / (self.count * len(std)))
        epsilon = max(RELATIVE_STD_FLOOR * rms, float(np.finfo(np.float32).tiny))
        meta = {"n_frames": int(self.count), "n_videos": int(self.videos), "epsilon": float(epsilon),
                "rms": float(rms)}
        return self.mean.astype(np.float32), np.maximum(std, epsilon).astype(np.float32), meta


def feature_statistics(videos: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """:class:`FeatureStatistics` over ``(T, D)`` arrays, one per video."""
    stats = FeatureStatistics()
    for values in videos:
        stats.add(values)
    return stats.finish()


def normalise_features(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` in float64, returned as float32. ``std`` must come from :func:`feature_statistics`
    (already floored); a zero or non-finite std is refused rather than turned into inf or NaN inputs."""
    return ((np.asarray(x, dtype=np.float64) - mean) / checked_std(std)).astype(np.float32)


def checked_std(std: Any) -> np.ndarray:
    """``std`` as float64, refused when it has a zero or non-finite entry (it did not come from
    :func:`feature_statistics`, whose floor prevents both)."""
    std = np.asarray(std, dtype=np.float64)
    if not np.all(std > 0) or not np.all(np.isfinite(std)):
        raise ValueError("the feature std has zero or non-finite entries: it must come from "
                         "hpcvid.learn.statistics.feature_statistics (retrain the run to refit it)")
    return std
