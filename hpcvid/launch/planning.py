"""Walltimes and shard counts from measured rates: what ``hpcvid plan`` prints and ``submit extract`` uses.

A shard's time is predicted as ``startup + videos x per_video + kept frames / frames_per_s`` from rates
measured with the job's own settings (:class:`Rates`: a calibration on a few of the dataset's videos, or a
file measured on a compute node). The recommended walltime adds a margin for the noise of shared nodes and
for videos slower than the calibration's, and is rounded up to whole 5 minutes. Pure arithmetic on a
manifest and rates, so it is tested on literal numbers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from hpcvid.launch.sharding import ShardSpec, select

MARGIN = 0.25            # +25 % of the predicted time ...
MARGIN_S = 300.0         # ... and 5 minutes more
ROUND_S = 300            # walltimes in whole 5 minutes


@dataclass(frozen=True)
class Rates:
    """Extraction speed with one set of settings, where it was measured."""

    frames_per_s: float            # kept frames per second of decoding + flow + features + writing
    per_video_s: float = 0.0       # per video on top (opening, probing, the part file)
    startup_s: float = 30.0        # per shard: the interpreter, the CNN's weights, the manifest
    settings: str = ""             # digest of the extraction settings they were measured with
    host: str = ""
    measured: str = ""
    videos: int = 0                # how many videos the measurement saw

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> "Rates":
        return cls(**{k: payload[k] for k in cls.__dataclass_fields__ if k in payload})


@dataclass(frozen=True)
class ShardLoad:
    index: int
    videos: int
    frames: int
    seconds: float                 # predicted, without margin


def shard_loads(frames_of: dict[str, int], count: int, rates: Rates) -> list[ShardLoad]:
    """The predicted load of each of ``count`` shards (videos dealt as extraction deals them: sorted ids,
    round robin). ``frames_of`` maps a video id to the frames extraction keeps of it."""
    ids = list(frames_of)
    loads = []
    for spec in (ShardSpec(i, count) for i in range(count)):
        mine = select(ids, spec, key=lambda v: v)
        frames = sum(frames_of[v] for v in mine)
        seconds = rates.startup_s + len(mine) * rates.per_video_s + frames / rates.frames_per_s
        loads.append(ShardLoad(spec.index, len(mine), frames, seconds))
    return loads


def with_margin(seconds: float) -> float:
    """The walltime to ask for a predicted time: + MARGIN, + MARGIN_S, rounded up to ROUND_S."""
    padded = seconds * (1 + MARGIN) + MARGIN_S
    return float(math.ceil(padded / ROUND_S) * ROUND_S)


def shards_for(frames_of: dict[str, int], rates: Rates, walltime_s: float) -> int | None:
    """The fewest shards whose largest fits ``walltime_s`` with the margin (None: not even one per video)."""
    low, high = 1, max(1, len(frames_of))
    if with_margin(max(load.seconds for load in shard_loads(frames_of, high, rates))) > walltime_s:
        return None
    while low < high:
        middle = (low + high) // 2
        if with_margin(max(load.seconds for load in shard_loads(frames_of, middle, rates))) <= walltime_s:
            high = middle
        else:
            low = middle + 1
    return low


def format_walltime(seconds: float) -> str:
    """Seconds -> D-HH:MM:SS (days only when needed), as sbatch takes it."""
    total = int(math.ceil(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{hours:02d}:{minutes:02d}:{secs:02d}"
    return f"{days}-{text}" if days else text


@dataclass(frozen=True)
class Plan:
    """What ``hpcvid plan`` reports for one shard count."""

    count: int
    loads: list[ShardLoad]
    walltime_s: float              # recommended: the largest shard with the margin
    fits: int | None = None        # shard count that fits the target walltime, when one is given
    target_s: float | None = None

    @property
    def largest(self) -> ShardLoad:
        return max(self.loads, key=lambda load: load.seconds)


def make_plan(frames_of: dict[str, int], count: int, rates: Rates, target_s: float | None = None) -> Plan:
    loads = shard_loads(frames_of, count, rates)
    walltime = with_margin(max(load.seconds for load in loads))
    fits = shards_for(frames_of, rates, target_s) if target_s else None
    return Plan(count, loads, walltime, fits, target_s)


def summary_lines(plan: Plan, rates: Rates, total_videos: int, max_walltime_s: float | None) -> list[str]:
    """The lines ``hpcvid plan`` prints (also used by ``submit extract`` to say what it chose)."""
    frames = sum(load.frames for load in plan.loads)
    largest = plan.largest
    lines = [
        f"plan: {total_videos} videos, {frames:,} kept frames in {plan.count} shard(s); rates: "
        f"{rates.frames_per_s:.1f} frames/s, {rates.per_video_s:.2f} s per video, {rates.startup_s:.0f} s start-up "
        f"(measured on {rates.videos} video(s) on {rates.host or 'this machine'})",
        f"largest shard: {largest.videos} videos, {largest.frames:,} frames, predicted "
        f"{format_walltime(largest.seconds)}; recommended --walltime {format_walltime(plan.walltime_s)} "
        f"(+{MARGIN:.0%} and {MARGIN_S / 60:.0f} min, in whole {ROUND_S // 60} min)",
    ]
    if plan.target_s is not None:
        if plan.fits is None:
            lines.append(f"no shard count fits {format_walltime(plan.target_s)}: one video alone takes longer")
        else:
            lines.append(f"{plan.fits} shard(s) fit a walltime of {format_walltime(plan.target_s)}")
    if max_walltime_s is not None and plan.walltime_s > max_walltime_s:
        lines.append(f"warning: the largest shard needs more than the partition's limit "
                     f"({format_walltime(max_walltime_s)}): use more shards")
    return lines


def kept_frames(videos: Sequence[Any], extract: Any) -> dict[str, int]:
    """Video id -> the frames extraction keeps of it with these settings (from the manifest's counts)."""
    from hpcvid.errors import HpcvidError
    from hpcvid.media.decode import sample_indices

    kept: dict[str, int] = {}
    for video in videos:
        if not video.frames:
            kept[video.id] = 0          # unreadable at index: extraction lists it as failed at once
            continue
        try:
            kept[video.id] = len(sample_indices(int(video.frames), extract, float(video.fps or 0.0)))
        except HpcvidError:
            kept[video.id] = int(video.frames)
    return kept
